"""Per-replica counters exposed by ``/v1/stats``: batch sizes, statuses (overall and by route), refusals."""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict


class BatchStats:
    """Batch-size histogram and counters of one replica (exposed by ``/v1/stats``)."""

    def __init__(self):
        self.hist: Counter = Counter()
        self.batches = 0
        self.items = 0
        self.generate_s = 0.0
        self.requests = 0
        self.status: Counter = Counter()
        self.routes: dict[str, Counter] = defaultdict(Counter)
        self.streams_cancelled = 0
        self.started = time.time()

    def record_batch(self, size: int, seconds: float) -> None:
        self.hist[size] += 1
        self.batches += 1
        self.items += size
        self.generate_s += seconds

    def record_status(self, status: int, route: str = "") -> None:
        """One answered request; by route: each status code and its class (``2xx``, ``4xx``, ``5xx``)."""
        self.requests += 1
        self.status[status] += 1
        if route:
            c = self.routes[route]
            c[str(status)] += 1
            c[f"{status // 100}xx"] += 1

    def snapshot(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "max_batch_size_seen": max(self.hist) if self.hist else 0,
            "batch_size_hist": {str(k): v for k, v in sorted(self.hist.items())},
            "generate_s": round(self.generate_s, 3),
            "requests": self.requests,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "routes": {r: dict(sorted(c.items())) for r, c in sorted(self.routes.items())},
            "overloaded": self.status.get(503, 0),
            "streams_cancelled": self.streams_cancelled,
            "uptime_s": round(time.time() - self.started, 1),
        }


def new_request_id() -> str:
    return uuid.uuid4().hex[:24]
