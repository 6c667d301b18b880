"""Any OpenAI-compatible chat-completions endpoint with image input as the judge, and the HTTP plumbing that the
datagen teacher and the remote agent share with it (bounded concurrency, retries on 429/5xx/timeouts with
``Retry-After``)."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .contract import B_ZERO_ERROR, JudgeRequest, JudgeResult, build_judge_sample, failure, result_from_reply
from .judges import JudgeConfigError, image_data_url, request_image_bytes
from .template import JudgeTemplate
from .template_loader import load_judge_template

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- OpenAI judge


@dataclass
class OpenAIJudgeConfig:
    """An OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, ...) used as the judge."""

    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # name of the variable holding the key; None = no auth
    require_api_key: bool = True  # False for local servers (vLLM) that take no key
    images_root: Optional[str] = None
    max_concurrency: int = 8
    timeout_s: float = 120.0  # per HTTP request (read); connect uses min(10, timeout_s)
    max_http_retries: int = 5  # on 429, 5xx, timeouts and connection errors
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0  # cap on a server's Retry-After
    max_retries: int = 2  # re-asks of an unparsable reply
    temperature: float = 0.0
    retry_temperature: float = 0.7
    max_tokens: int = 512
    seed: Optional[int] = 0
    image_detail: Optional[str] = None  # "low" | "high" | "auto" (OpenAI); None = omit
    extra_body: dict = field(default_factory=dict)  # merged into every request body (e.g. vLLM options)
    template_path: Optional[str] = None
    name: Optional[str] = None

    @classmethod
    def from_dict(cls, d: dict) -> OpenAIJudgeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"OpenAIJudgeConfig: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class _RequestFailed(Exception):
    pass


def _retry_after_s(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reply_text(body: Any) -> str:
    msg = body["choices"][0]["message"]
    content = msg.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    return content


def retry_options(config) -> dict:
    """``post_with_retries`` keyword arguments from a client config with the usual retry fields
    (``max_http_retries``, ``backoff_initial_s``, ``backoff_max_s``, ``retry_after_max_s``)."""
    return dict(
        tries=config.max_http_retries + 1,
        backoff_initial_s=config.backoff_initial_s,
        backoff_max_s=config.backoff_max_s,
        retry_after_max_s=config.retry_after_max_s,
    )


async def post_with_retries(
    client,
    url: str,
    payload: dict,
    *,
    tries: int,
    backoff_initial_s: float,
    backoff_max_s: float,
    retry_after_max_s: float,
    rng: random.Random,
    retryable: Callable[[int], bool],
    fatal_status: Sequence[int],
    parse: Callable[[Any], Any],
    fail_with: type,
    on_attempt: Callable[[], None] = lambda: None,
):
    """POST ``payload`` to ``url`` (an ``httpx.AsyncClient``) and return ``parse(response)`` of the first 200.

    Timeouts, connection errors, malformed 200 bodies and ``retryable(status)`` answers are retried up to ``tries``
    requests in all, with jittered exponential backoff (or the server's Retry-After, capped); ``fatal_status`` raises
    :class:`JudgeConfigError` (no retry can fix it); any other status, or running out of tries, raises
    ``fail_with(message)`` for this request alone."""
    import httpx

    last = ""
    for attempt in range(tries):
        delay = min(backoff_max_s, backoff_initial_s * 2**attempt) * (0.5 + 0.5 * rng.random())
        on_attempt()
        try:
            r = await client.post(url, json=payload)
        except httpx.TimeoutException as e:
            last = f"timeout ({type(e).__name__})"
        except httpx.TransportError as e:
            last = f"connection error ({type(e).__name__}: {e})"
        else:
            if r.status_code == 200:
                try:
                    return parse(r)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    last = f"malformed response body ({type(e).__name__}: {e}): {r.text[:200]!r}"
            elif r.status_code in fatal_status:
                raise JudgeConfigError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
            elif retryable(r.status_code):
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                ra = _retry_after_s(r.headers.get("retry-after"))
                if ra is not None:
                    delay = min(ra, retry_after_max_s)
            else:  # e.g. 400/413: this request is bad (image too large, ...); retrying will not help
                raise fail_with(f"HTTP {r.status_code}: {r.text[:300]}")
        if attempt < tries - 1:
            log.debug("request to %s failed (%s); retrying in %.2fs", url, last, delay)
            await asyncio.sleep(delay)
    raise fail_with(f"gave up after {tries} HTTP tries: {last}")


class OpenAIJudge:
    """Scores requests through an OpenAI-compatible chat-completions API, ``max_concurrency`` at a time."""

    RETRY_STATUS = (408, 409, 425, 429)  # plus every 5xx
    FATAL_STATUS = (401, 403, 404)

    def __init__(self, config: OpenAIJudgeConfig, template: Optional[JudgeTemplate] = None):
        self.config = config
        self.template = template or load_judge_template(config.template_path)
        self.name = config.name or f"openai:{config.model}"
        self.api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if self.api_key is None and config.require_api_key:
            raise JudgeConfigError(
                f"OpenAIJudge: environment variable {config.api_key_env!r} (the API key) is not set; "
                "set it, or use require_api_key=False for a server without auth"
            )
        if config.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._rng = random.Random(config.seed)  # backoff jitter
        self.http_attempts = 0  # total HTTP requests sent (observability, tests)

    # -- request building
    def build_messages(self, request: JudgeRequest, data_url: str) -> list[dict]:
        sample = build_judge_sample(request, self.template)
        image_part: dict = {"type": "image_url", "image_url": {"url": data_url}}
        if self.config.image_detail:
            image_part["image_url"]["detail"] = self.config.image_detail
        return [
            {"role": "system", "content": sample.system},
            {"role": "user", "content": [image_part, {"type": "text", "text": sample.user_text}]},
        ]

    def _payload(self, messages: list[dict], attempt: int) -> dict:
        c = self.config
        body = {
            "model": c.model,
            "messages": messages,
            "max_tokens": c.max_tokens,
            "temperature": c.temperature if attempt == 0 else c.retry_temperature,
        }
        if c.seed is not None:
            body["seed"] = c.seed + attempt
        body.update(c.extra_body)
        return body

    async def _post(self, client, payload: dict) -> str:
        c = self.config

        def count() -> None:
            self.http_attempts += 1

        return await post_with_retries(
            client,
            self.url,
            payload,
            **retry_options(c),
            rng=self._rng,
            retryable=lambda status: status in self.RETRY_STATUS or status >= 500,
            fatal_status=self.FATAL_STATUS,
            parse=lambda r: _reply_text(r.json()),
            fail_with=_RequestFailed,
            on_attempt=count,
        )

    async def _score_one(self, client, sem: asyncio.Semaphore, request: JudgeRequest, urls: dict) -> JudgeResult:
        t0 = time.perf_counter()
        try:
            ck = request.image if request.image_bytes is None else f"{request.sample_id}:{request.image}"
            if ck not in urls:
                urls[ck] = image_data_url(request_image_bytes(request, self.config.images_root), request.image)
            messages = self.build_messages(request, urls[ck])
        except Exception as e:  # unusable image: this request fails, the run goes on
            return failure(request, f"image: {e}", judge=self.name)
        text, res = "", None
        for attempt in range(self.config.max_retries + 1):
            try:
                # The slot is held through backoff sleeps on purpose: an overloaded server gets fewer requests.
                async with sem:
                    text = await self._post(client, self._payload(messages, attempt))
            except _RequestFailed as e:
                return failure(
                    request,
                    str(e),
                    review=text,
                    attempts=attempt + 1,
                    judge=self.name,
                    elapsed_s=time.perf_counter() - t0,
                )
            res = result_from_reply(
                request, text, attempts=attempt + 1, judge=self.name, elapsed_s=time.perf_counter() - t0
            )
            if res.ok or res.error == B_ZERO_ERROR:
                return res
        assert res is not None
        res.error = f"unparsable after {self.config.max_retries + 1} replies: {res.error}"
        return res

    async def ascore_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        import httpx

        c = self.config
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(c.timeout_s, connect=min(10.0, c.timeout_s))
        limits = httpx.Limits(max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency)
        sem = asyncio.Semaphore(c.max_concurrency)
        urls: dict[str, str] = {}
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
            return list(await asyncio.gather(*(self._score_one(client, sem, r, urls) for r in requests)))

    def score_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ascore_batch(requests))
        # Called from inside an event loop (notebook, async actor): run on a helper thread.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, self.ascore_batch(requests)).result()
