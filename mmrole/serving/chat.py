"""OpenAI ``/v1/chat/completions`` requests and responses."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mmrole.data.records import Sample
from mmrole.models.config import GenerationParams
from mmrole.serving.errors import bad_request
from mmrole.serving.fields import TextBudget, field_value
from mmrole.serving.generation import parse_generation, parse_stream
from mmrole.serving.images import REQUEST_IMAGE, decode_image_url, probe_image
from mmrole.serving.settings import RequestLimits


@dataclass
class ChatInput:
    """A validated ``/v1/chat/completions`` request, as one MMRole-style sample (system + image + text)."""

    model: Optional[str]
    system: Optional[str]
    history: list[str]  # earlier turns, "[role]: text", oldest first (dropped first when too long)
    user_text: str
    image: bytes
    image_param: str
    params: GenerationParams
    stream: bool = False
    include_usage: bool = False  # usage in the last chunk of a stream
    turns: list = field(default_factory=list)  # (role, text) of the user/assistant messages, the last one included

    def sample(self, sample_id: str, default_system: str) -> Sample:
        header = "The conversation so far:\n" if self.history else ""
        return Sample(
            id=sample_id,
            system=self.system if self.system is not None else default_system,
            user_text=self.user_text
            if not self.history
            else header + "\n".join(self.history) + "\n\n" + self.user_text,
            image=REQUEST_IMAGE,
            target="",
            role="assistant",
            other_role="user",
            script="",
            dialogue_type="chat",
            k=len(self.history),
            prompt_head="",
            history_header=header,
            history_lines=list(self.history),
            history_footer="\n\n",
            prompt_tail=self.user_text,
        )


_CHAT_ROLES = ("system", "developer", "user", "assistant")


def parse_chat(body: Mapping, limits: RequestLimits, defaults: GenerationParams) -> ChatInput:
    """Validate an OpenAI chat request: text and ``image_url`` (data: URL) parts; exactly one image overall.

    Unknown top-level fields are ignored (OpenAI clients send many); known fields are type-checked."""
    model = field_value(body, "model", str, "model")
    messages = field_value(body, "messages", list, "messages", required=True)
    if not messages:
        raise bad_request("messages", "'messages' must not be empty", "invalid_value")
    if len(messages) > limits.max_messages:
        raise bad_request(
            "messages", f"'messages' has {len(messages)} entries; the cap is {limits.max_messages}", "too_many_messages"
        )
    params = parse_generation(body, limits, defaults)
    stream, include_usage = parse_stream(body)
    budget = TextBudget(limits)
    systems: list[str] = []
    turns: list[tuple[str, str]] = []
    images: list[tuple[str, Any]] = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(p, f"'{p}' must be an object", "wrong_type")
        role = field_value(m, "role", str, f"{p}.role", required=True)
        if role not in _CHAT_ROLES:
            raise bad_request(
                f"{p}.role", f"'{p}.role' must be one of {list(_CHAT_ROLES)}, got {role[:40]!r}", "invalid_value"
            )
        content = m.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(budget.take(content, f"{p}.content"))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pp = f"{p}.content[{j}]"
                if not isinstance(part, dict):
                    raise bad_request(pp, f"'{pp}' must be an object", "wrong_type")
                ptype = field_value(part, "type", str, f"{pp}.type", required=True)
                if ptype == "text":
                    texts.append(budget.take(field_value(part, "text", str, f"{pp}.text", required=True), f"{pp}.text"))
                elif ptype == "image_url":
                    if role != "user":
                        raise bad_request(pp, f"'{pp}': images are accepted in user messages only", "invalid_value")
                    iu = part.get("image_url")
                    if iu is None:
                        raise bad_request(
                            f"{pp}.image_url", f"missing required field '{pp}.image_url'", "missing_field"
                        )
                    ip = f"{pp}.image_url"
                    if isinstance(iu, dict):  # {"url": ..., "detail": ...}
                        iu, ip = iu.get("url"), f"{ip}.url"
                    images.append((ip, iu))
                    if len(images) > limits.max_images:
                        raise bad_request(
                            pp, f"too many images: at most {limits.max_images} per request", "too_many_images"
                        )
                else:
                    raise bad_request(
                        f"{pp}.type", f"'{pp}.type' {ptype[:40]!r} is not supported (text, image_url)", "unsupported"
                    )
        elif content is None:
            raise bad_request(f"{p}.content", f"missing required field '{p}.content'", "missing_field")
        else:
            raise bad_request(f"{p}.content", f"'{p}.content' must be a string or an array of parts", "wrong_type")
        text = "\n".join(t for t in texts if t)
        if role in ("system", "developer"):
            systems.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise bad_request("messages", "the last non-system message must come from the user", "invalid_value")
    if not images:
        raise bad_request(
            "messages",
            "this model needs exactly one image: add an image_url part (data: URL) to a user message",
            "missing_image",
        )
    image_param, url = images[0]
    data = decode_image_url(url, limits, image_param)
    probe_image(data, limits, image_param)
    history = [f"[{r}]: {t}" for r, t in turns[:-1]]
    return ChatInput(
        model=model,
        system="\n\n".join(systems) if systems else None,
        history=history,
        user_text=turns[-1][1],
        image=data,
        image_param=image_param,
        params=params,
        stream=stream,
        include_usage=include_usage,
        turns=turns,
    )


def chat_response(
    request_id: str, model: str, text: str, prompt_tokens: int, completion_tokens: int, max_new_tokens: int
) -> dict:
    """An OpenAI ``chat.completion`` object. ``finish_reason`` is "length" when the reply used the whole budget."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length" if completion_tokens >= max_new_tokens else "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models_response(names: Sequence[str], created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": created, "owned_by": "mmrole"} for n in names],
    }
