"""Tolerant reading of a teacher's JSON reply: code fences, prose around the object, trailing commas."""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_REFUSAL = re.compile(
    r"(\bI(?:'m| am) sorry\b|\bI can(?:no|')t (?:help|assist|comply|do that|write)|\bI(?:'m| am) (?:not able|unable) to\b"
    r"|\bI won'?t be able to\b|抱歉|无法(?:协助|帮助|完成))",
    re.IGNORECASE,
)


class ReplyError(ValueError):
    """A reply that is not the JSON object asked for; ``code`` is ``refusal`` or ``malformed_json``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _balanced_object(text: str) -> str | None:
    """The first balanced ``{...}`` in ``text`` (string-aware), or None."""
    start = text.find("{")
    while start != -1:
        depth, in_str, esc = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


def is_refusal(text: str) -> bool:
    """Whether a non-JSON reply reads like the teacher declining the task."""
    return bool(_REFUSAL.search(text[:400]))


def parse_json_reply(text: str) -> dict:
    """The JSON object in a reply; raises :class:`ReplyError` (refusal / malformed_json) naming what was wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ReplyError("malformed_json", "empty reply")
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    obj = _balanced_object(text)
    if obj:
        candidates.append(obj)
    for c in candidates:
        for variant in (c, _TRAILING_COMMA.sub(r"\1", c)):
            try:
                value = json.loads(variant)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    if is_refusal(text):
        raise ReplyError("refusal", f"the teacher declined: {text.strip()[:160]!r}")
    raise ReplyError("malformed_json", f"no JSON object in the reply: {text.strip()[:160]!r}")
