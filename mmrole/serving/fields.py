"""Typed access to JSON request fields, body-size checks and the per-request text budget."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Optional

from mmrole.data.records import IMAGE_MARKER_PATTERN
from mmrole.models.encoding import CONTROL_TOKENS
from mmrole.serving.errors import RequestError, bad_request
from mmrole.serving.settings import RequestLimits

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def field_value(obj: Mapping, key: str, typ, path: str, required: bool = False, default: Any = None) -> Any:
    """``obj[key]`` checked against ``typ`` (a type or tuple); ``None`` counts as absent."""
    v = obj.get(key)
    if v is None:
        if required:
            raise bad_request(path, f"missing required field '{path}'", "missing_field")
        return default
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and int not in types:
        types = types + (int,)
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise bad_request(path, f"'{path}' must be {want}, got {type(v).__name__}", "wrong_type")
    return v


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object (400 otherwise)."""
    if not raw:
        raise bad_request(None, "request body is empty; expected a JSON object", "invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad_request(None, f"request body is not valid JSON ({type(e).__name__}: {str(e)[:120]})", "invalid_json")
    if not isinstance(body, dict):
        raise bad_request(None, f"request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    return body


def check_content_length(value: Optional[str], limits: RequestLimits) -> None:
    """Refuse a declared body above the cap before reading it."""
    if value is None:
        return
    try:
        n = int(value)
    except ValueError:
        raise bad_request(None, f"bad Content-Length header {value[:40]!r}", "bad_header")
    if n > limits.max_body_bytes:
        raise body_too_large(limits)


def body_too_large(limits: RequestLimits) -> RequestError:
    return RequestError(413, f"request body exceeds {limits.max_body_bytes} bytes", None, "body_too_large")


class TextBudget:
    """Counts the text of one request against ``max_text_chars`` and refuses chat-template control tokens."""

    def __init__(self, limits: RequestLimits):
        self.left = limits.max_text_chars
        self.cap = limits.max_text_chars

    def take(self, text: str, param: str) -> str:
        for tok in CONTROL_TOKENS:  # chat-template markers in user text would forge turns or image slots
            if tok in text:
                raise bad_request(param, f"'{param}' contains the reserved control token {tok}", "control_token")
        marker = IMAGE_MARKER_PATTERN.search(text)  # the encoder would put an image there
        if marker:
            raise bad_request(param, f"'{param}' contains the reserved image marker {marker.group(0)}", "control_token")
        self.left -= len(text)
        if self.left < 0:
            raise RequestError(
                413, f"request text exceeds {self.cap} characters (at '{param}')", param, "text_too_long"
            )
        return text


_SAFE_HEADER = re.compile(r"[^A-Za-z0-9_.:-]")


def header_value(s: str) -> str:
    """A value safe to put in a response header."""
    return _SAFE_HEADER.sub("_", s)[:128]
