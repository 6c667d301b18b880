"""The teacher client: chat completions against any OpenAI-compatible endpoint, bounded concurrency, retries.

HTTP retries (429, 5xx, timeouts, connection errors) with jittered backoff go through
:func:`mmrole.eval.openai_judge.post_with_retries`; a malformed (non-JSON) reply is re-asked ``max_reasks`` times. Each
request ends as a :class:`TeacherResult` (never an exception), so one bad item never stops a stage; a 401/403/404
marks every later request of the run as failed too (no retry can fix a bad key or URL).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from mmrole.eval.judges import JudgeConfigError
from mmrole.eval.openai_judge import post_with_retries, retry_options

from .config import TeacherConfig
from .parse import ReplyError, parse_json_reply

RETRY_STATUS = (408, 409, 425, 429)  # plus every 5xx
FATAL_STATUS = (401, 403, 404)


class TeacherRequestFailed(Exception):
    """One request failed for good (HTTP error, gave up after retries)."""


class TeacherAuthError(RuntimeError):
    """The API key is missing (named variable) or refused."""


@dataclass
class TeacherRequest:
    key: str  # cache key of the item
    messages: list
    schema_name: str
    schema: dict
    seed_offset: int = 0  # several dialogues from one prompt get different seeds


@dataclass
class TeacherResult:
    key: str
    reply: Optional[dict] = None  # the parsed JSON object
    text: str = ""  # the last raw reply
    error_code: str = ""  # "" | malformed_json | refusal | timeout | http | auth
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    http_attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.reply is not None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _body(r) -> tuple[str, dict]:
    data = r.json()
    msg = data["choices"][0]["message"]
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    usage = data.get("usage") or {}
    return content, usage if isinstance(usage, dict) else {}


@dataclass
class TeacherClient:
    """Async client for one run (or one Ray actor): ``await call_many(requests)``."""

    config: TeacherConfig
    max_concurrency: Optional[int] = None
    _structured: Optional[bool] = None  # None: not tried yet (auto mode)
    _fatal: str = ""
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __post_init__(self):
        c = self.config
        self.url = c.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(c.api_key_env) if c.api_key_env else None
        if self.api_key is None and c.require_api_key:
            raise TeacherAuthError(
                f"teacher: environment variable {c.api_key_env!r} (the API key) is not set; set it, or use "
                "teacher.require_api_key=false for a local server without auth"
            )
        if c.structured_output == "off":
            self._structured = False
        elif c.structured_output == "json_schema":
            self._structured = True
        self._rng = random.Random(c.seed)

    def payload(self, req: TeacherRequest, attempt: int) -> dict:
        c = self.config
        body: dict[str, Any] = {
            "model": c.model,
            "messages": req.messages,
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
        }
        if c.seed is not None:
            body["seed"] = c.seed + req.seed_offset * 1000 + attempt
        if self._structured is not False:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": req.schema_name, "schema": req.schema, "strict": False},
            }
        return body

    async def _post(self, client, req: TeacherRequest, attempt: int, res: TeacherResult) -> str:
        c = self.config

        def count() -> None:
            res.http_attempts += 1

        async def post(payload):
            return await post_with_retries(
                client,
                self.url,
                payload,
                **retry_options(c),
                rng=self._rng,
                retryable=lambda status: status in RETRY_STATUS or status >= 500,
                fatal_status=FATAL_STATUS,
                parse=_body,
                fail_with=TeacherRequestFailed,
                on_attempt=count,
            )

        payload = self.payload(req, attempt)
        try:
            text, usage = await post(payload)
        except TeacherRequestFailed as e:
            # auto mode: an endpoint that refuses response_format (HTTP 400) is asked again without it.
            auto = self.config.structured_output == "auto" and self._structured is not True
            if auto and "response_format" in payload and "HTTP 400" in str(e):
                self._structured = False
                text, usage = await post(self.payload(req, attempt))
            else:
                raise
        if self.config.structured_output == "auto" and self._structured is None:
            self._structured = True
        res.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        res.completion_tokens += int(usage.get("completion_tokens") or 0)
        return text

    async def call_one(self, client, sem: asyncio.Semaphore, req: TeacherRequest) -> TeacherResult:
        res = TeacherResult(key=req.key)
        for attempt in range(self.config.max_reasks + 1):
            if self._fatal:
                res.error_code, res.error = "auth", self._fatal
                return res
            try:
                async with sem:
                    res.text = await self._post(client, req, attempt, res)
            except JudgeConfigError as e:
                self._fatal = f"the teacher refused the request for good: {e}"
                res.error_code, res.error = "auth", self._fatal
                return res
            except TeacherRequestFailed as e:
                msg = str(e)
                res.error_code = "timeout" if "timeout" in msg.lower() else "http"
                res.error = msg
                return res
            try:
                res.reply = parse_json_reply(res.text)
                res.error_code = res.error = ""
                return res
            except ReplyError as e:
                res.error_code, res.error = e.code, str(e)
        return res

    async def acall_many(self, requests: list[TeacherRequest]) -> list[TeacherResult]:
        import httpx

        c = self.config
        n = self.max_concurrency or c.max_concurrency
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(c.timeout_s, connect=min(10.0, c.timeout_s))
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        sem = asyncio.Semaphore(n)
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
            return list(await asyncio.gather(*(self.call_one(client, sem, r) for r in requests)))

    def call_many(self, requests: list[TeacherRequest]) -> list[TeacherResult]:
        """Blocking wrapper (runs its own event loop, on a helper thread when one is already running)."""
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.acall_many(requests))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, self.acall_many(requests)).result()
