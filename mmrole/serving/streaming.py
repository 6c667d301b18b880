"""Server-sent events of streamed replies: OpenAI ``chat.completion.chunk`` objects and role-play chunks, an error
event for a failure after the stream started, and the ``[DONE]`` sentinel."""

from __future__ import annotations

import json
import time
from typing import Optional

from mmrole.serving.errors import RequestError

DONE = b"data: [DONE]\n\n"


def sse(data: dict) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def text_delta(sent: str, now: str) -> str:
    """What to send after ``sent`` when the reply so far is ``now`` (nothing when ``now`` rewrote the past, e.g.
    a stop string cut it; the final text settles it)."""
    return now[len(sent) :] if now.startswith(sent) else ""


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    content: Optional[str] = None,
    role: Optional[str] = None,
    finish_reason: Optional[str] = None,
    usage: Optional[dict] = None,
    with_choice: bool = True,
) -> dict:
    """An OpenAI ``chat.completion.chunk``; the usage-only chunk (``stream_options.include_usage``) has no
    choices."""
    delta: dict = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if with_choice else []
    out = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None or not with_choice:
        out["usage"] = usage
    return out


def roleplay_chunk(request_id: str, model: str, character: str, delta: str) -> dict:
    """A piece of a streamed role-play reply; the last event is the whole ``roleplay.reply``."""
    return {
        "id": f"roleplay-{request_id}",
        "object": "roleplay.chunk",
        "created": int(time.time()),
        "model": model,
        "character": character,
        "delta": delta,
    }


def error_event(exc: BaseException) -> dict:
    """The error of a stream that failed after it started (same JSON shape as an error response)."""
    if isinstance(exc, RequestError):
        return exc.body()
    return {
        "error": {
            "message": f"generation failed ({type(exc).__name__})",
            "type": "server_error",
            "param": None,
            "code": "stream_failed",
        }
    }
