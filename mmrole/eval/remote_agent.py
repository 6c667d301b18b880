"""An answering agent behind an OpenAI-compatible ``/chat/completions`` endpoint (an API such as GPT-4o, a vLLM or
SGLang server, or our own Serve agent): bounded concurrency, retries with backoff on 429/5xx and timeouts, the key
from an environment variable. Per-sample problems become recorded failures; 401/403/404 stop the run."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mmrole.config import ConfigError

from .judges import JudgeConfigError, image_data_url
from .openai_judge import post_with_retries, retry_options


@dataclass
class OpenAIAgentConfig:
    """``agent.openai`` of the answering job (``agent.kind: openai``)."""

    model: str = ""  # the model name at the endpoint
    base_url: str = "https://api.openai.com/v1"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # name of the variable holding the key
    require_api_key: bool = True  # False for local servers (vLLM, our Serve agent) that take no key
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_http_retries: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    image_detail: Optional[str] = None  # "low" | "high" | "auto" (OpenAI); None = omit
    extra_body: dict = field(default_factory=dict)  # merged into every request body
    jitter_seed: int = 0

    def __post_init__(self):
        if self.max_concurrency < 1:
            raise ConfigError(f"agent.openai.max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.timeout_s <= 0:
            raise ConfigError(f"agent.openai.timeout_s: must be positive, got {self.timeout_s}")
        if self.max_http_retries < 0:
            raise ConfigError(f"agent.openai.max_http_retries: must be >= 0, got {self.max_http_retries}")


class _AnswerFailed(Exception):
    pass


def _reply(r) -> str:
    msg = r.json()["choices"][0]["message"]
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    return content


class OpenAIAgent:
    """Answers rendered samples (system + image + question) through a chat-completions endpoint."""

    RETRY_STATUS = (408, 409, 425, 429)  # plus every 5xx
    FATAL_STATUS = (401, 403, 404)

    def __init__(self, config: OpenAIAgentConfig, generation: Any):
        if not config.model:
            raise ConfigError("agent.openai.model: the model name at the endpoint is required")
        self.config = config
        self.generation = generation
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if self.api_key is None and config.require_api_key:
            raise JudgeConfigError(
                f"agent.openai: environment variable {config.api_key_env!r} (the API key for {self.url}) is not "
                "set; set it, or agent.openai.require_api_key=false for a server without auth"
            )
        self._rng = random.Random(config.jitter_seed)
        self.http_attempts = 0

    def payload(self, system: str, user_text: str, data_url: str) -> dict:
        g = self.generation
        image = {"url": data_url}
        if self.config.image_detail:
            image["detail"] = self.config.image_detail
        body = {
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": system},
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": user_text}],
                },
            ],
            "max_tokens": g.max_new_tokens,
            "temperature": g.temperature if g.do_sample else 0.0,
            "top_p": g.top_p,
        }
        if g.seed is not None:
            body["seed"] = g.seed
        if g.stop:
            body["stop"] = list(g.stop)
        body.update(self.config.extra_body)
        return body

    async def _one(self, client, sem, system: str, user_text: str, image: bytes, name: str) -> tuple[str, str]:
        """(answer, "") or ("", reason)."""
        try:
            data_url = image_data_url(image, name)
        except Exception as e:  # unusable image: this sample fails, the run goes on
            return "", f"image: {e}"
        c = self.config

        def count():
            self.http_attempts += 1

        try:
            async with sem:
                text = await post_with_retries(
                    client,
                    self.url,
                    self.payload(system, user_text, data_url),
                    **retry_options(c),
                    rng=self._rng,
                    retryable=lambda status: status in self.RETRY_STATUS or status >= 500,
                    fatal_status=self.FATAL_STATUS,
                    parse=_reply,
                    fail_with=_AnswerFailed,
                    on_attempt=count,
                )
        except _AnswerFailed as e:
            return "", f"endpoint {self.url}: {e}"
        return text, ""

    async def aanswer(self, items: Sequence[tuple[str, str, bytes, str]]) -> list[tuple[str, str]]:
        import httpx

        c = self.config
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(c.timeout_s, connect=min(10.0, c.timeout_s))
        limits = httpx.Limits(max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency)
        sem = asyncio.Semaphore(c.max_concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
            return list(await asyncio.gather(*(self._one(client, sem, *it) for it in items)))

    def answer(self, items: Sequence[tuple[str, str, bytes, str]]) -> list[tuple[str, str]]:
        """``[(system, user_text, image bytes, image name)] -> [(answer, error)]``, in order."""
        return asyncio.run(self.aanswer(items))
