"""One replica batch: prepare each row and decode the batch, grouped by engine and adapter (runs on the gen
thread, see :mod:`serve.common`)."""

from __future__ import annotations

import logging
from typing import Any

from mmrole.serving import RequestError

from .engine import Job, Row

log = logging.getLogger("ray.serve")


def decode_batch(jobs: list[Job]) -> tuple[list[Any], int]:
    """Prepare and decode one batch (on the replica's gen thread): one ``generate`` call per (engine, adapter).
    Each job gets a :class:`Row`, or the exception its preparation raised (a :class:`RequestError` for bad
    input; a bug fails its row as a 500); the other rows still decode. Returns (results, rows decoded)."""
    out: list[Any] = [None] * len(jobs)
    ready: list[int] = []
    for i, j in enumerate(jobs):
        if j.sink is not None and j.sink.cancelled:  # its client left while it waited
            out[i] = RequestError(499, "client closed the request", None, "cancelled")
            continue
        try:
            if j.encoded is None:
                j.encoded = j.prepare()
            ready.append(i)
        except RequestError as e:
            out[i] = e
        except Exception as e:  # a bug, not bad input: fail this row (500), not the whole batch
            log.exception("preparing a row failed")
            out[i] = e
    n_ready = len(ready)
    groups: dict[tuple, list[int]] = {}  # one generate call per (engine, adapter)
    for i in ready:
        groups.setdefault((id(jobs[i].engine), jobs[i].adapter), []).append(i)
    for idx in groups.values():
        eng = jobs[idx[0]].engine
        if eng.pool is not None:
            try:
                eng.pool.activate(jobs[idx[0]].adapter)
            except Exception as e:  # an unloadable adapter fails its rows, not the batch
                log.exception("activating adapter %s failed", jobs[idx[0]].adapter)
                for i in idx:
                    out[i] = e
                continue
        texts = eng.generate([jobs[i].encoded for i in idx], [jobs[i].params for i in idx], [jobs[i].sink for i in idx])
        for i, t in zip(idx, texts):
            enc = jobs[i].encoded
            out[i] = Row(
                text=t,
                batch_size=n_ready,
                prompt_tokens=int(len(enc["input_ids"])),
                completion_tokens=min(eng.count_tokens(t), jobs[i].params.max_new_tokens),
                history_dropped=int(enc.get("history_dropped", 0)),
            )
    return out, n_ready


def is_fatal(e: BaseException) -> bool:
    """Errors after which this process cannot be trusted to decode again (CUDA faults, device OOM)."""
    text = f"{type(e).__name__}: {e}"
    return "CUDA" in text or "OutOfMemoryError" in text or "device-side assert" in text
