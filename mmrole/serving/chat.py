"""OpenAI ``/v1/chat/completions`` requests and responses."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mmrole.data.records import Sample, image_marker
from mmrole.models.config import MULTI_IMAGE_FAMILIES, GenerationParams
from mmrole.serving.errors import bad_request
from mmrole.serving.fields import TextBudget, field_value
from mmrole.serving.generation import parse_generation, parse_stream
from mmrole.serving.images import REQUEST_IMAGE, decode_image_url, probe_image
from mmrole.serving.settings import RequestLimits


@dataclass
class ChatInput:
    """A validated ``/v1/chat/completions`` request, as one MMRole-style sample (system + image(s) + text).

    One image goes first in the prompt (the MMRole layout); with several, each turn's text carries an
    ``image_marker`` where the request put the image, and the encoder puts the image there."""

    model: Optional[str]
    system: Optional[str]
    history: list[str]  # earlier turns, "[role]: text", oldest first (dropped first when too long)
    user_text: str
    images: list[bytes]  # in request order
    image_params: list[str]  # the field of each image (messages[i].content[j].image_url[.url])
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


def images_per_request(limits: RequestLimits, family: str) -> tuple[int, str]:
    """(most images one chat request may carry, what sets that number) for a model of ``family``."""
    if family in MULTI_IMAGE_FAMILIES or limits.max_images == 1:
        return limits.max_images, "limits.max_images"
    return 1, f"a {family!r} model is served with one image per prompt"


def parse_chat(
    body: Mapping, limits: RequestLimits, defaults: GenerationParams, image_cap: Optional[tuple[int, str]] = None
) -> ChatInput:
    """Validate an OpenAI chat request: text and ``image_url`` (data: URL) parts; 1 to ``image_cap`` images
    (:func:`images_per_request`; default ``limits.max_images``), counted before any is decoded, then each
    checked (bytes, header) and their pixels summed against ``limits.max_total_image_pixels``.

    Unknown top-level fields are ignored (OpenAI clients send many); known fields are type-checked."""
    max_images, cap_reason = image_cap or (limits.max_images, "limits.max_images")
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
    turns: list[tuple[str, list]] = []  # (role, [text or ("image", index), ...])
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
        texts: list = []
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
                    texts.append(("image", len(images) - 1))
                    if len(images) > max_images:
                        raise bad_request(
                            pp,
                            f"'{pp}': too many images: at most {max_images} per request ({cap_reason})",
                            "too_many_images",
                        )
                else:
                    raise bad_request(
                        f"{pp}.type", f"'{pp}.type' {ptype[:40]!r} is not supported (text, image_url)", "unsupported"
                    )
        elif content is None:
            raise bad_request(f"{p}.content", f"missing required field '{p}.content'", "missing_field")
        else:
            raise bad_request(f"{p}.content", f"'{p}.content' must be a string or an array of parts", "wrong_type")
        if role in ("system", "developer"):
            systems.append("\n".join(t for t in texts if t))
        else:
            turns.append((role, texts))
    if not turns or turns[-1][0] != "user":
        raise bad_request("messages", "the last non-system message must come from the user", "invalid_value")
    if not images:
        raise bad_request(
            "messages",
            "this model needs an image: add an image_url part (data: URL) to a user message",
            "missing_image",
        )
    datas: list[bytes] = []
    pixels = 0
    for param, url in images:
        datas.append(decode_image_url(url, limits, param))
        w, h, _ = probe_image(datas[-1], limits, param)
        pixels += w * h
        if pixels > limits.max_total_image_pixels:
            raise bad_request(
                param,
                f"'{param}': the request's images hold more than {limits.max_total_image_pixels} pixels together "
                "(limits.max_total_image_pixels)",
                "image_too_large",
            )
    texts = [(r, _turn_text(parts, len(images) > 1)) for r, parts in turns]
    history = [f"[{r}]: {t}" for r, t in texts[:-1]]
    return ChatInput(
        model=model,
        system="\n\n".join(systems) if systems else None,
        history=history,
        user_text=texts[-1][1],
        images=datas,
        image_params=[p for p, _ in images],
        params=params,
        stream=stream,
        include_usage=include_usage,
        turns=texts,
    )


def _turn_text(parts: list, mark_images: bool) -> str:
    """A message's text parts joined by newlines; with ``mark_images``, each image's marker where it was."""
    out = ""
    prev_text = False
    for part in parts:
        if isinstance(part, tuple):
            if mark_images:
                out, prev_text = out + image_marker(part[1]), False
        elif part:
            out, prev_text = out + ("\n" if prev_text else "") + part, True
    return out


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
