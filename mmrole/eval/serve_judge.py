"""A :class:`~mmrole.eval.contract.Judge` backed by the reward-model Serve app (``POST /v1/score``).

The server builds the judge prompt, parses and re-asks exactly as the offline ``VLMJudge`` does, so results are
interchangeable. Requests of one sample (same answer, reference, image, swap) go out as one call with their metrics;
the server fans them out into batched judge calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from .contract import JudgeRequest, JudgeResult, failure
from .judges import image_data_url, request_image_bytes
from .openai_judge import post_with_retries

log = logging.getLogger(__name__)


class _GroupFailed(Exception):
    pass


@dataclass
class ServeJudgeConfig:
    base_url: str  # e.g. http://127.0.0.1:8001 (the app's route prefix included, if any)
    token: Optional[str] = None  # bearer token; None reads token_env
    token_env: str = "MMROLE_API_TOKEN"
    images_root: Optional[str] = None
    max_concurrency: int = 8  # HTTP calls in flight (each carries up to 8 metrics)
    timeout_s: float = 300.0
    max_http_retries: int = 5  # on 429/503/5xx, timeouts and connection errors
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retries: Optional[int] = None  # re-asks of unparsable replies; None = the server's setting
    name: Optional[str] = None


class ServeJudge:
    """``ServeJudge("http://127.0.0.1:8001", token)`` scores requests through a running judge app."""

    RETRY_STATUS = (408, 429, 500, 502, 503, 504)
    FATAL_STATUS = (401, 403, 404, 405)

    def __init__(self, base_url: str, token: Optional[str] = None, **kw):
        self.config = ServeJudgeConfig(base_url=base_url, token=token, **kw)
        c = self.config
        self.token = c.token if c.token is not None else (os.environ.get(c.token_env) or None)
        root = c.base_url.rstrip("/")
        self.url = root + ("/score" if root.endswith("/v1") else "/v1/score")
        self.name = c.name or f"serve:{root}"
        self._rng = random.Random(0)
        self.http_calls = 0

    def _payload(self, group: list[JudgeRequest], data_url: str) -> dict:
        r = group[0]
        body = {
            "sample_id": r.sample_id,
            "question": r.question,
            "answer": r.answer,
            "reference": r.reference,
            "image": data_url,
            "metrics": [g.metric for g in group],
            "role": r.role,
            "other_role": r.other_role,
            "script": r.script,
            "swapped": r.swapped,
            "set_name": r.set_name,
            "dialogue_type": r.dialogue_type,
        }
        if self.config.max_retries is not None:
            body["max_retries"] = self.config.max_retries
        return body

    async def _post(self, client, payload: dict) -> dict:
        c = self.config

        def count() -> None:
            self.http_calls += 1

        return await post_with_retries(
            client,
            self.url,
            payload,
            tries=c.max_http_retries + 1,
            backoff_initial_s=c.backoff_initial_s,
            backoff_max_s=c.backoff_max_s,
            retry_after_max_s=c.backoff_max_s,
            rng=self._rng,
            retryable=lambda status: status in self.RETRY_STATUS,
            fatal_status=self.FATAL_STATUS,
            parse=lambda r: r.json(),
            fail_with=_GroupFailed,
            on_attempt=count,
        )

    async def _score_group(self, client, sem, group: list[JudgeRequest]) -> list[JudgeResult]:
        from mmrole.serving import result_from_item

        t0 = time.perf_counter()
        try:
            url = image_data_url(request_image_bytes(group[0], self.config.images_root), group[0].image)
        except Exception as e:  # unusable image: these requests fail, the run goes on
            return [failure(r, f"image: {e}", judge=self.name) for r in group]
        try:
            async with sem:
                body = await self._post(client, self._payload(group, url))
        except _GroupFailed as e:
            return [failure(r, str(e), judge=self.name, elapsed_s=time.perf_counter() - t0) for r in group]
        items = {it.get("metric"): it for it in body.get("results", [])}
        elapsed = (time.perf_counter() - t0) / max(1, len(group))
        out = []
        for r in group:
            it = items.get(r.metric)
            out.append(
                result_from_item(r.sample_id, it, self.name, elapsed)
                if it is not None
                else failure(r, "server returned no result for this metric", judge=self.name)
            )
        return out

    async def ascore_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        import httpx

        c = self.config
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (
                r.sample_id,
                r.swapped,
                r.question,
                r.answer,
                r.reference,
                r.image,
                r.role,
                r.other_role,
                r.script,
                id(r.image_bytes) if r.image_bytes is not None else None,
            )
            idx = groups.setdefault(key, [])
            if any(requests[j].metric == r.metric for j in idx):  # duplicate metric: send it separately
                idx = groups.setdefault(key + (i,), [])
            idx.append(i)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = httpx.Timeout(c.timeout_s, connect=min(10.0, c.timeout_s))
        limits = httpx.Limits(max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency)
        sem = asyncio.Semaphore(c.max_concurrency)
        results: list[Optional[JudgeResult]] = [None] * len(requests)
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
            idx_lists = list(groups.values())
            outs = await asyncio.gather(
                *(self._score_group(client, sem, [requests[i] for i in idx]) for idx in idx_lists)
            )
        for idx, res in zip(idx_lists, outs):
            for i, r in zip(idx, res):
                results[i] = r
        return results  # type: ignore[return-value]

    def score_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ascore_batch(requests))
        from concurrent.futures import ThreadPoolExecutor  # called from an event loop: use a helper thread

        with ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, self.ascore_batch(requests)).result()
