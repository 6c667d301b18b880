"""Serving logic without Ray: typed app configs, request validation, role-play rendering and response shaping.

The Ray Serve applications in ``serve/`` are a thin shell around this module, so everything that decides whether a
request is acceptable is unit-testable without a cluster. Every refusal is a :class:`RequestError` with an HTTP
status (always 4xx for bad input) and an OpenAI-style JSON body whose ``param`` names the offending field.
Validation order matters: cheap checks (sizes, types, counts, image headers) run before any image decoding or model
work, so malformed or hostile input never reaches the model.

Importing this module does not import ray or torch.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hmac
import io
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from mmrole.config import ConfigError, build_dataclass, path_field
from mmrole.data.images import ImageError, open_image_bytes
from mmrole.data.records import HUMAN_SPEAKER, Character, ImageRef, Sample, Turn, infer_kind, infer_language
from mmrole.data.render import assemble_question, render_question
from mmrole.data.templates import RoleplayTemplate
from mmrole.eval.contract import B_ZERO_ERROR, JudgeRequest, JudgeResult
from mmrole.eval.metrics import METRICS, check_metrics
from mmrole.models.config import GenerationParams, VLMConfig
from mmrole.models.encoding import CONTROL_TOKENS

TOKEN_ENV = "MMROLE_API_TOKEN"
# Formats Pillow decodes safely and that image processors accept; anything else (e.g. PDF, EPS, ICO) is refused.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
REQUEST_IMAGE = "<request>"  # Sample.image of an image that came in the request body


# ------------------------------------------------------------------------------------------------ errors


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message and the offending field (``param``)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: str = "invalid_request",
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _bad(param: Optional[str], message: str, code: str = "invalid_request", status: int = 400) -> RequestError:
    return RequestError(status, message, param, code)


# ------------------------------------------------------------------------------------------------ configs


def _from_dict(cls, d: Optional[Mapping], where: str):
    """Dataclass built by the one config system; unknown keys and wrong types fail naming the dotted key."""
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    return build_dataclass(cls, dict(d), "", where if where != cls.__name__ else "")


@dataclass
class RequestLimits:
    """What one request may carry. Checked before any image decoding or model work."""

    max_body_bytes: int = 16 * 2**20
    max_images: int = 1  # the MMRole agents and judges look at one image per sample
    max_image_bytes: int = 8 * 2**20  # decoded (binary) size of one image
    max_image_pixels: int = 25_000_000  # width * height, read from the image header
    max_image_side: int = 12_000
    max_aspect_ratio: float = 200.0  # Qwen's smart_resize refuses more extreme shapes
    max_new_tokens: int = 1024  # upper bound for max_tokens
    max_text_chars: int = 100_000  # all text of one request together
    max_messages: int = 64
    max_history_turns: int = 64
    max_stop: int = 4
    max_stop_chars: int = 64

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"limits.{f.name} must be positive")

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> RequestLimits:
        return _from_dict(cls, d, "limits")


@dataclass
class BatchSettings:
    """``@serve.batch``: a batch runs when it is full or when its first row has waited ``batch_wait_timeout_s``
    (only waited while other requests are in flight: a lone request starts at once)."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError("batching.max_batch_size must be >= 1")
        if self.batch_wait_timeout_s < 0:
            raise ValueError("batching.batch_wait_timeout_s must be >= 0")

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> BatchSettings:
        return _from_dict(cls, d, "batching")


@dataclass
class DeploymentSettings:
    """Ray Serve deployment options, typed. ``autoscaling`` (a Serve ``autoscaling_config``) replaces
    ``num_replicas``. ``max_ongoing_requests`` must be >= the batch size, or batches never fill."""

    num_replicas: Optional[int] = 1
    autoscaling: Optional[dict] = None
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64  # beyond this the proxy answers 503 at once instead of queueing
    num_cpus: float = 0.5  # fractional: on small boxes whole-CPU replicas starve other Ray tasks
    num_gpus: float = 0.0
    memory_bytes: Optional[int] = None
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 30.0
    env: dict = field(default_factory=dict)  # extra environment variables of the replicas

    def __post_init__(self):
        if self.autoscaling is not None:
            self.num_replicas = None  # Serve refuses both
        elif self.num_replicas is None or self.num_replicas < 1:
            raise ValueError("deployment.num_replicas must be >= 1 (or give deployment.autoscaling)")
        if self.max_ongoing_requests < 1 or self.max_queued_requests == 0 or self.max_queued_requests < -1:
            raise ValueError("deployment.max_ongoing_requests must be >= 1, max_queued_requests >= 1 (or -1)")

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> DeploymentSettings:
        return _from_dict(cls, d, "deployment")

    def serve_options(self) -> dict:
        """Keyword arguments for ``Deployment.options(...)``."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.memory_bytes:
            actor["memory"] = self.memory_bytes
        if self.env:
            actor["runtime_env"] = {"env_vars": {str(k): str(v) for k, v in self.env.items()}}
        opts: dict[str, Any] = dict(
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            ray_actor_options=actor,
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=self.health_check_timeout_s,
            graceful_shutdown_wait_loop_s=self.graceful_shutdown_wait_loop_s,
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
        )
        if self.autoscaling is not None:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


@dataclass
class AppConfig:
    """Settings shared by the agent and the judge app (the ``args`` of a Serve config)."""

    model: dict = field(default_factory=dict)  # VLMConfig fields; model_path "tiny:<family>" builds a tiny model
    model_name: str = "mmrole"
    generation: dict = field(default_factory=dict)  # default GenerationParams
    limits: RequestLimits = field(default_factory=RequestLimits)
    batching: BatchSettings = field(default_factory=BatchSettings)
    deployment: DeploymentSettings = field(default_factory=DeploymentSettings)
    # Path fields are marked but not resolved at build time: each replica reads them in its own copy of the app's
    # working dir (runtime_env), which is where a relative path in a Serve config points.
    dataset_root: Optional[str] = path_field(
        "input", literals=("demo",), default=None
    )  # characters for /v1/roleplay; "demo" builds the demo dataset
    template_path: Optional[str] = path_field(
        "input", default=None
    )  # role-play template (None: $MMROLE_ROLEPLAY_TEMPLATE or packaged)
    api_token_env: str = TOKEN_ENV  # bearer-token auth is on when this variable is set and non-empty
    torch_threads: Optional[int] = None
    stuck_batch_s: float = 600.0  # a batch running longer than this makes check_health fail (replica restarts)

    def __post_init__(self):
        self.limits = RequestLimits.from_dict(self.limits)
        self.batching = BatchSettings.from_dict(self.batching)
        self.deployment = DeploymentSettings.from_dict(self.deployment)
        if not self.model.get("model_path"):
            raise ValueError("model.model_path is required (a model dir, a hub id, or tiny:<family>)")
        VLMConfig.from_dict(self.model)  # typos and wrong types fail at deploy time, naming model.<key>
        GenerationParams.from_dict(self.generation)  # typos fail at deploy time, not at the first request
        if self.deployment.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"deployment.max_ongoing_requests ({self.deployment.max_ongoing_requests}) must be >= "
                f"batching.max_batch_size ({self.batching.max_batch_size}), or batches stay small"
            )

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> AppConfig:
        return _from_dict(cls, d, cls.__name__)

    def default_params(self) -> GenerationParams:
        return GenerationParams.from_dict(self.generation)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AgentAppConfig(AppConfig):
    """The role-playing agent. ``adapters`` maps extra model names to LoRA adapter (or full model) dirs, served
    from the same deployment with Serve model multiplexing."""

    model_name: str = "mmrole-agent"
    adapters: dict = field(default_factory=dict)


@dataclass
class JudgeAppConfig(AppConfig):
    """The reward-model judge: unparsable replies are re-asked like the offline ``VLMJudge`` (sampling with
    ``retry_temperature`` and seed ``seed + attempt``)."""

    model_name: str = "mmrole-judge"
    judge_template_path: Optional[str] = path_field("input", default=None)
    max_retries: int = 2
    retry_temperature: float = 0.7

    def __post_init__(self):
        super().__post_init__()
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")


# ------------------------------------------------------------------------------------------------ auth


def check_bearer(authorization: Optional[str], token: Optional[str]) -> bool:
    """True when auth is off (no token) or the header is ``Bearer <token>`` (constant-time comparison)."""
    if not token:
        return True
    if not authorization:
        return False
    scheme, _, cred = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(cred.strip().encode("utf-8"), token.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ fields


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def _get(obj: Mapping, key: str, typ, path: str, required: bool = False, default: Any = None) -> Any:
    """``obj[key]`` checked against ``typ`` (a type or tuple); ``None`` counts as absent."""
    v = obj.get(key)
    if v is None:
        if required:
            raise _bad(path, f"missing required field '{path}'", "missing_field")
        return default
    types = typ if isinstance(typ, tuple) else (typ,)
    if float in types and int not in types:
        types = types + (int,)
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise _bad(path, f"'{path}' must be {want}, got {type(v).__name__}", "wrong_type")
    return v


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object (400 otherwise)."""
    if not raw:
        raise _bad(None, "request body is empty; expected a JSON object", "invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(None, f"request body is not valid JSON ({type(e).__name__}: {str(e)[:120]})", "invalid_json")
    if not isinstance(body, dict):
        raise _bad(None, f"request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    return body


def check_content_length(value: Optional[str], limits: RequestLimits) -> None:
    """Refuse a declared body above the cap before reading it."""
    if value is None:
        return
    try:
        n = int(value)
    except ValueError:
        raise _bad(None, f"bad Content-Length header {value[:40]!r}", "bad_header")
    if n > limits.max_body_bytes:
        raise body_too_large(limits)


def body_too_large(limits: RequestLimits) -> RequestError:
    return RequestError(413, f"request body exceeds {limits.max_body_bytes} bytes", None, "body_too_large")


# ------------------------------------------------------------------------------------------------ images


def decode_image_url(url: Any, limits: RequestLimits, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL. Remote URLs are refused: the server never fetches."""
    if isinstance(url, dict):  # {"url": ...} as in OpenAI image_url parts
        url = url.get("url")
        param = f"{param}.url"
    if not isinstance(url, str) or not url:
        raise _bad(param, f"'{param}' must be a data: URL string", "wrong_type")
    scheme = url[:12].lower()
    if scheme.startswith(("http://", "https://", "ftp://", "file:")):
        raise _bad(
            param,
            f"'{param}': remote image URLs are not fetched; send the image inline as a "
            "data:image/<type>;base64,... URL",
            "remote_url_not_allowed",
        )
    if not scheme.startswith("data:"):
        raise _bad(param, f"'{param}' must be a data:image/<type>;base64,... URL", "invalid_image_url")
    head, sep, payload = url.partition(",")
    if not sep:
        raise _bad(param, f"'{param}': data URL has no ',' before the payload", "invalid_image_url")
    media = [p.strip().lower() for p in head[5:].split(";")]
    if "base64" not in media[1:]:
        raise _bad(param, f"'{param}': data URL must be base64-encoded (';base64,')", "invalid_image_url")
    if media[0] and not media[0].startswith("image/"):
        raise _bad(param, f"'{param}': media type {media[0]!r} is not an image", "invalid_image_url")
    if len(payload) > 4 * (limits.max_image_bytes // 3 + 1) + 1024:  # checked before decoding (whitespace slack)
        raise _bad(param, f"'{param}': image exceeds {limits.max_image_bytes} bytes", "image_too_large")
    if any(c in payload for c in " \n\r\t"):  # base64 wrapped over lines (MIME style)
        payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(param, f"'{param}': payload is not valid base64", "invalid_base64")
    if not data:
        raise _bad(param, f"'{param}': image is empty (0 bytes)", "empty_image")
    if len(data) > limits.max_image_bytes:
        raise _bad(
            param,
            f"'{param}': image is {len(data)} bytes, above the cap of {limits.max_image_bytes}",
            "image_too_large",
        )
    return data


def probe_image(data: bytes, limits: RequestLimits, param: str) -> tuple[int, int, str]:
    """(width, height, format) from the image header, checked against the limits; decodes no pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = (im.format or "").upper(), im.size
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, DecompressionBombError, ...)
        raise _bad(param, f"'{param}': not a readable image ({type(e).__name__})", "invalid_image")
    if fmt not in ALLOWED_IMAGE_FORMATS:
        raise _bad(
            param,
            f"'{param}': image format {fmt or '?'} not accepted; use one of {ALLOWED_IMAGE_FORMATS}",
            "invalid_image",
        )
    if w < 1 or h < 1:
        raise _bad(param, f"'{param}': image has no pixels ({w}x{h})", "invalid_image")
    if w > limits.max_image_side or h > limits.max_image_side or w * h > limits.max_image_pixels:
        raise _bad(
            param,
            f"'{param}': image is {w}x{h}; the caps are {limits.max_image_side} px a side and "
            f"{limits.max_image_pixels} pixels",
            "image_too_large",
        )
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise _bad(
            param, f"'{param}': image aspect ratio {w}x{h} exceeds {limits.max_aspect_ratio:g}:1", "invalid_image"
        )
    return w, h, fmt


def decode_image(data: bytes, limits: RequestLimits, param: str):
    """Full decode to RGB (after :func:`probe_image`); corrupt or truncated data -> 400."""
    try:
        return open_image_bytes(data, param, limits.max_image_pixels)
    except ImageError as e:
        raise _bad(param, f"'{param}': {str(e)[:200]}", "invalid_image")


# ------------------------------------------------------------------------------------------------ generation


def parse_generation(body: Mapping, limits: RequestLimits, defaults: GenerationParams) -> GenerationParams:
    """OpenAI-style decoding fields -> GenerationParams. temperature 0 = greedy; omitted = the app default."""
    n = _get(body, "n", int, "n")
    if n is not None and n != 1:
        raise _bad("n", "only n=1 is supported", "unsupported")
    if _get(body, "stream", bool, "stream", default=False):
        raise _bad("stream", "streaming is not supported; set stream=false", "unsupported")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = _get(body, key, int, key, default=defaults.max_new_tokens)
    if not 1 <= max_new <= limits.max_new_tokens:
        raise _bad(key, f"'{key}' must be between 1 and {limits.max_new_tokens}, got {max_new}", "invalid_value")
    temperature = _get(body, "temperature", float, "temperature")
    top_p = _get(body, "top_p", float, "top_p", default=defaults.top_p)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"'top_p' must be in (0, 1], got {top_p}", "invalid_value")
    if temperature is None:
        do_sample, temperature = defaults.do_sample, defaults.temperature
    else:
        if not 0 <= temperature <= 2:
            raise _bad("temperature", f"'temperature' must be in [0, 2], got {temperature}", "invalid_value")
        do_sample = temperature > 0
        temperature = temperature if do_sample else 1.0
    seed = _get(body, "seed", int, "seed", default=defaults.seed)
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad("seed", "'seed' must be a non-negative 63-bit integer", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stops = list(defaults.stop or [])
    else:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop", "'stop' must be a non-empty string or an array of them", "wrong_type")
        if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
            raise _bad(
                "stop",
                f"'stop': at most {limits.max_stop} strings of up to {limits.max_stop_chars} chars",
                "invalid_value",
            )
    return GenerationParams(
        max_new_tokens=int(max_new),
        do_sample=bool(do_sample),
        temperature=float(temperature),
        top_p=float(top_p),
        min_new_tokens=min(defaults.min_new_tokens, int(max_new)),
        seed=seed,
        stop=stops or None,
    )


def params_key(p: GenerationParams) -> tuple:
    """Requests whose params share this key can be decoded in one ``generate`` call (stops are applied after)."""
    if p.do_sample:
        return (p.max_new_tokens, p.min_new_tokens, True, round(p.temperature, 6), round(p.top_p, 6), p.seed)
    return (p.max_new_tokens, p.min_new_tokens, False, None, None, None)


def apply_stops(text: str, stops: Optional[Sequence[str]]) -> str:
    """Cut ``text`` before the first stop string (as OpenAI does); the stop itself is not returned."""
    cut = len(text)
    for s in stops or ():
        j = text.find(s)
        if 0 <= j < cut:
            cut = j
    return text[:cut].strip() if cut < len(text) else text


class _TextBudget:
    """Counts the text of one request against ``max_text_chars`` and refuses chat-template control tokens."""

    def __init__(self, limits: RequestLimits):
        self.left = limits.max_text_chars
        self.cap = limits.max_text_chars

    def take(self, text: str, param: str) -> str:
        for tok in CONTROL_TOKENS:  # chat-template markers in user text would forge turns or image slots
            if tok in text:
                raise _bad(param, f"'{param}' contains the reserved control token {tok}", "control_token")
        self.left -= len(text)
        if self.left < 0:
            raise RequestError(
                413, f"request text exceeds {self.cap} characters (at '{param}')", param, "text_too_long"
            )
        return text


# ------------------------------------------------------------------------------------------------ chat


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
    model = _get(body, "model", str, "model")
    messages = _get(body, "messages", list, "messages", required=True)
    if not messages:
        raise _bad("messages", "'messages' must not be empty", "invalid_value")
    if len(messages) > limits.max_messages:
        raise _bad(
            "messages", f"'messages' has {len(messages)} entries; the cap is {limits.max_messages}", "too_many_messages"
        )
    params = parse_generation(body, limits, defaults)
    budget = _TextBudget(limits)
    systems: list[str] = []
    turns: list[tuple[str, str]] = []
    images: list[tuple[str, Any]] = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(p, f"'{p}' must be an object", "wrong_type")
        role = _get(m, "role", str, f"{p}.role", required=True)
        if role not in _CHAT_ROLES:
            raise _bad(
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
                    raise _bad(pp, f"'{pp}' must be an object", "wrong_type")
                ptype = _get(part, "type", str, f"{pp}.type", required=True)
                if ptype == "text":
                    texts.append(budget.take(_get(part, "text", str, f"{pp}.text", required=True), f"{pp}.text"))
                elif ptype == "image_url":
                    if role != "user":
                        raise _bad(pp, f"'{pp}': images are accepted in user messages only", "invalid_value")
                    iu = part.get("image_url")
                    if iu is None:
                        raise _bad(f"{pp}.image_url", f"missing required field '{pp}.image_url'", "missing_field")
                    ip = f"{pp}.image_url"
                    if isinstance(iu, dict):  # {"url": ..., "detail": ...}
                        iu, ip = iu.get("url"), f"{ip}.url"
                    images.append((ip, iu))
                    if len(images) > limits.max_images:
                        raise _bad(pp, f"too many images: at most {limits.max_images} per request", "too_many_images")
                else:
                    raise _bad(
                        f"{pp}.type", f"'{pp}.type' {ptype[:40]!r} is not supported (text, image_url)", "unsupported"
                    )
        elif content is None:
            raise _bad(f"{p}.content", f"missing required field '{p}.content'", "missing_field")
        else:
            raise _bad(f"{p}.content", f"'{p}.content' must be a string or an array of parts", "wrong_type")
        text = "\n".join(t for t in texts if t)
        if role in ("system", "developer"):
            systems.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise _bad("messages", "the last non-system message must come from the user", "invalid_value")
    if not images:
        raise _bad(
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


# ------------------------------------------------------------------------------------------------ role-play


@dataclass
class RoleplayInput:
    """A validated role-play request: who speaks (and to whom), about which image, after which turns."""

    character: Character
    other: Optional[Character]  # None: the other party is the human
    history: list[Turn]
    message: Optional[str]  # the other party's last words; None asks the role to open the conversation
    image_info: ImageRef
    sample_id: str = ""
    model: Optional[str] = None


def _character(spec: Any, characters: Mapping[str, Character], param: str, budget: _TextBudget) -> Character:
    if isinstance(spec, str):
        if spec in characters:
            return characters[spec]
        close = difflib.get_close_matches(spec, list(characters), n=3)
        hint = (
            f"; did you mean {close}?"
            if close
            else ("" if characters else "; this server has no dataset loaded, give the profile inline")
        )
        raise RequestError(404, f"'{param}': unknown character {spec[:80]!r}{hint}", param, "unknown_character")
    if isinstance(spec, dict):
        allowed = {"name", "profile", "script", "language", "kind"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise _bad(param, f"'{param}': unknown field(s) {extra}; allowed {sorted(allowed)}", "unknown_field")
        name = _get(spec, "name", str, f"{param}.name", required=True).strip()
        profile = budget.take(_get(spec, "profile", str, f"{param}.profile", required=True), f"{param}.profile")
        if not name:
            raise _bad(f"{param}.name", f"'{param}.name' must not be empty", "invalid_value")
        script = _get(spec, "script", str, f"{param}.script", default="")
        kind = _get(spec, "kind", str, f"{param}.kind", default=None) or infer_kind(script)
        if kind not in ("fictional", "historical-or-public", "hypothetical"):
            raise _bad(
                f"{param}.kind",
                f"'{param}.kind' must be fictional, historical-or-public or hypothetical",
                "invalid_value",
            )
        language = _get(spec, "language", str, f"{param}.language", default=None) or infer_language(name, profile)
        return Character(name=name, script=script, group="inline", kind=kind, language=language, profile=profile)
    raise _bad(param, f"'{param}' must be a character name or an object with name and profile", "wrong_type")


def parse_roleplay_fields(
    body: Mapping,
    limits: RequestLimits,
    characters: Mapping[str, Character],
    prefix: str = "",
    budget: Optional[_TextBudget] = None,
) -> RoleplayInput:
    """The role-play fields (character, other, history, message, image_info) of ``body``."""
    budget = budget or _TextBudget(limits)

    def p(k: str) -> str:
        return f"{prefix}{k}"

    if body.get("character") is None:
        raise _bad(p("character"), f"missing required field '{p('character')}'", "missing_field")
    role = _character(body["character"], characters, p("character"), budget)
    other_spec = body.get("other")
    other = None
    if other_spec is not None and not (isinstance(other_spec, str) and other_spec.strip().lower() == HUMAN_SPEAKER):
        other = _character(other_spec, characters, p("other"), budget)
    hist = _get(body, "history", list, p("history"), default=[])
    if len(hist) > limits.max_history_turns:
        raise _bad(
            p("history"),
            f"'{p('history')}' has {len(hist)} turns; the cap is {limits.max_history_turns}",
            "too_many_turns",
        )
    turns: list[Turn] = []
    for i, h in enumerate(hist):
        hp = f"{p('history')}[{i}]"
        if not isinstance(h, dict):
            raise _bad(hp, f"'{hp}' must be an object with speaker and text", "wrong_type")
        speaker = _get(h, "speaker", str, f"{hp}.speaker", required=True)
        text = budget.take(_get(h, "text", str, f"{hp}.text", required=True), f"{hp}.text")
        turns.append(Turn(speaker=speaker, text=text))
    message = _get(body, "message", str, p("message"))
    if message is not None:
        budget.take(message, p("message"))
        if not message.strip():
            raise _bad(
                p("message"), f"'{p('message')}' must not be blank (omit it to let the role open)", "invalid_value"
            )
    info = _get(body, "image_info", dict, p("image_info"), default={})
    unknown = sorted(set(info) - {"role_info", "place_info", "scene_info"})
    if unknown:
        raise _bad(p("image_info"), f"'{p('image_info')}': unknown field(s) {unknown}", "unknown_field")
    ref = ImageRef(
        REQUEST_IMAGE,
        *(
            budget.take(_get(info, k, str, f"{p('image_info')}.{k}", default="") or "", f"{p('image_info')}.{k}")
            or None
            for k in ("role_info", "place_info", "scene_info")
        ),
    )
    return RoleplayInput(character=role, other=other, history=turns, message=message, image_info=ref)


def parse_roleplay(
    body: Mapping, limits: RequestLimits, defaults: GenerationParams, characters: Mapping[str, Character]
) -> tuple[RoleplayInput, bytes, GenerationParams]:
    """Validate a ``/v1/roleplay`` request: role-play fields, ``image`` (data: URL) and decoding options."""
    budget = _TextBudget(limits)
    inp = parse_roleplay_fields(body, limits, characters, budget=budget)
    inp.model = _get(body, "model", str, "model")
    inp.sample_id = _get(body, "id", str, "id", default="")[:200]
    params = parse_generation(body, limits, defaults)
    if body.get("image") is None:
        raise _bad("image", "missing required field 'image' (a data:image/...;base64 URL)", "missing_image")
    data = decode_image_url(body["image"], limits, "image")
    probe_image(data, limits, "image")
    return inp, data, params


def roleplay_sample(inp: RoleplayInput, template: RoleplayTemplate, sample_id: str) -> Sample:
    """The sample the agent answers, rendered exactly as training renders a dialogue turn (same template)."""
    head, header, lines, tail = render_question(
        template, inp.character, inp.other, inp.image_info, inp.history, inp.message
    )
    other_name = template.human_indefinite if inp.other is None else inp.other.name
    return Sample(
        id=sample_id,
        system=template.system,
        user_text=assemble_question(head, header, lines, template.section_separator, tail),
        image=REQUEST_IMAGE,
        target="",
        role=inp.character.name,
        other_role=other_name,
        script=inp.character.script,
        dialogue_type="inter-role" if inp.other is not None else "human-role",
        k=len(inp.history) + (1 if inp.message is not None else 0),
        group=inp.character.group,
        prompt_head=head,
        history_header=header,
        history_lines=lines,
        history_footer=template.section_separator,
        prompt_tail=tail,
    )


def roleplay_response(
    request_id: str, model: str, inp: RoleplayInput, reply: str, usage: dict, history_dropped: int
) -> dict:
    return {
        "id": f"roleplay-{request_id}",
        "object": "roleplay.reply",
        "created": int(time.time()),
        "model": model,
        "character": inp.character.name,
        "other": inp.other.name if inp.other is not None else HUMAN_SPEAKER,
        "reply": reply,
        "history_dropped": history_dropped,
        "usage": usage,
    }


# ------------------------------------------------------------------------------------------------ judge


@dataclass
class ScoreInput:
    """A validated ``/v1/score`` request: one judge request per metric, sharing one image."""

    requests: list[JudgeRequest]
    image: bytes
    max_retries: int


def parse_score(
    body: Mapping,
    limits: RequestLimits,
    characters: Mapping[str, Character],
    template: Optional[RoleplayTemplate],
    max_retries_cap: int,
) -> ScoreInput:
    """Validate a score request. The question is given as text (``question``) or as role-play fields
    (``sample``: character, other, history, message, image_info), rendered with the role-play template."""
    budget = _TextBudget(limits)
    sample_id = _get(body, "sample_id", str, "sample_id", default="request")[:200]
    answer = budget.take(_get(body, "answer", str, "answer", required=True), "answer")
    reference = budget.take(_get(body, "reference", str, "reference", required=True), "reference")
    metrics_in = _get(body, "metrics", list, "metrics")
    if metrics_in is not None:
        if not metrics_in or not all(isinstance(m, str) for m in metrics_in):
            raise _bad("metrics", "'metrics' must be a non-empty array of metric names", "wrong_type")
        unknown = [m for m in dict.fromkeys(metrics_in) if m not in METRICS]
        if unknown:
            raise _bad("metrics", f"unknown metric(s) {unknown[:8]}; known: {list(METRICS)}", "unknown_metric")
    metrics = check_metrics(metrics_in)
    role = _get(body, "role", str, "role", default="")
    other_role = _get(body, "other_role", str, "other_role", default="")
    script = _get(body, "script", str, "script", default="")
    question = _get(body, "question", str, "question")
    sample = _get(body, "sample", dict, "sample")
    if (question is None) == (sample is None):
        raise _bad("question", "give exactly one of 'question' (text) or 'sample' (role-play fields)", "missing_field")
    if question is not None:
        budget.take(question, "question")
    else:
        if template is None:
            raise _bad("sample", "this server has no role-play template; send 'question'", "unsupported")
        rp = parse_roleplay_fields(sample, limits, characters, prefix="sample.", budget=budget)
        s = roleplay_sample(rp, template, sample_id)
        question = s.user_text
        role, other_role, script = role or s.role, other_role or s.other_role, script or s.script
    swapped = _get(body, "swapped", bool, "swapped", default=False)
    retries = _get(body, "max_retries", int, "max_retries", default=max_retries_cap)
    if not 0 <= retries <= max_retries_cap:
        raise _bad("max_retries", f"'max_retries' must be between 0 and {max_retries_cap}", "invalid_value")
    if body.get("image") is None:
        raise _bad("image", "missing required field 'image' (a data:image/...;base64 URL)", "missing_image")
    data = decode_image_url(body["image"], limits, "image")
    probe_image(data, limits, "image")
    reqs = [
        JudgeRequest(
            sample_id=sample_id,
            metric=m,
            question=question,
            answer=answer,
            reference=reference,
            image=REQUEST_IMAGE,
            role=role,
            other_role=other_role,
            script=script,
            set_name=_get(body, "set_name", str, "set_name", default=""),
            dialogue_type=_get(body, "dialogue_type", str, "dialogue_type", default=""),
            swapped=swapped,
        )
        for m in metrics
    ]
    return ScoreInput(requests=reqs, image=data, max_retries=retries)


def parse_status(result: JudgeResult) -> str:
    """``ok``, ``zero_reference`` (parsed, but B = 0) or ``unparsable``."""
    if result.ok:
        return "ok"
    return "zero_reference" if result.error == B_ZERO_ERROR else "unparsable"


def score_response(sample_id: str, judge: str, results: Sequence[JudgeResult]) -> dict:
    """Per metric: review text, score pair, ratio A/B and parse status (plus counts)."""
    items = []
    for r in results:
        items.append(
            {
                "metric": r.metric,
                "ok": r.ok,
                "parse_status": parse_status(r),
                "review": r.review,
                "score": [r.score_a, r.score_b] if r.ok else None,
                "ratio": r.ratio,
                "error": r.error,
                "attempts": r.attempts,
                "swapped": r.swapped,
            }
        )
    n_ok = sum(1 for r in results if r.ok)
    return {
        "object": "score",
        "sample_id": sample_id,
        "judge": judge,
        "results": items,
        "parsed": n_ok,
        "failed": len(results) - n_ok,
    }


def result_from_item(sample_id: str, item: Mapping, judge: str, elapsed_s: float = 0.0) -> JudgeResult:
    """A :class:`JudgeResult` from one entry of a ``/v1/score`` response (client side)."""
    ok = bool(item.get("ok"))
    score = item.get("score") or [None, None]
    return JudgeResult(
        sample_id=sample_id,
        metric=item["metric"],
        ok=ok,
        score_a=float(score[0]) if ok else None,
        score_b=float(score[1]) if ok else None,
        review=item.get("review") or "",
        error=item.get("error"),
        attempts=int(item.get("attempts") or 1),
        swapped=bool(item.get("swapped")),
        judge=judge,
        elapsed_s=elapsed_s,
    )


# ------------------------------------------------------------------------------------------------ stats


class BatchStats:
    """Batch-size histogram and counters of one replica (exposed by ``/v1/stats``)."""

    def __init__(self):
        self.hist: Counter = Counter()
        self.batches = 0
        self.items = 0
        self.generate_s = 0.0
        self.requests = 0
        self.status: Counter = Counter()
        self.started = time.time()

    def record_batch(self, size: int, seconds: float) -> None:
        self.hist[size] += 1
        self.batches += 1
        self.items += size
        self.generate_s += seconds

    def record_status(self, status: int) -> None:
        self.requests += 1
        self.status[status] += 1

    def snapshot(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "max_batch_size_seen": max(self.hist) if self.hist else 0,
            "batch_size_hist": {str(k): v for k, v in sorted(self.hist.items())},
            "generate_s": round(self.generate_s, 3),
            "requests": self.requests,
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "uptime_s": round(time.time() - self.started, 1),
        }


def new_request_id() -> str:
    return uuid.uuid4().hex[:24]


def image_data_url(data: bytes, mime: str = "image/png") -> str:
    """A ``data:`` URL for raw image bytes (client helper)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


_SAFE_HEADER = re.compile(r"[^A-Za-z0-9_.:-]")


def header_value(s: str) -> str:
    """A value safe to put in a response header."""
    return _SAFE_HEADER.sub("_", s)[:128]
