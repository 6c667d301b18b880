"""OpenAI-style decoding fields -> GenerationParams; grouping key and stop strings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from mmrole.models.config import GenerationParams
from mmrole.serving.errors import bad_request
from mmrole.serving.fields import field_value
from mmrole.serving.settings import RequestLimits


def parse_generation(body: Mapping, limits: RequestLimits, defaults: GenerationParams) -> GenerationParams:
    """OpenAI-style decoding fields -> GenerationParams. temperature 0 = greedy; omitted = the app default."""
    n = field_value(body, "n", int, "n")
    if n is not None and n != 1:
        raise bad_request("n", "only n=1 is supported", "unsupported")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = field_value(body, key, int, key, default=defaults.max_new_tokens)
    if not 1 <= max_new <= limits.max_new_tokens:
        raise bad_request(key, f"'{key}' must be between 1 and {limits.max_new_tokens}, got {max_new}", "invalid_value")
    temperature = field_value(body, "temperature", float, "temperature")
    top_p = field_value(body, "top_p", float, "top_p", default=defaults.top_p)
    if not 0 < top_p <= 1:
        raise bad_request("top_p", f"'top_p' must be in (0, 1], got {top_p}", "invalid_value")
    if temperature is None:
        do_sample, temperature = defaults.do_sample, defaults.temperature
    else:
        if not 0 <= temperature <= 2:
            raise bad_request("temperature", f"'temperature' must be in [0, 2], got {temperature}", "invalid_value")
        do_sample = temperature > 0
        temperature = temperature if do_sample else 1.0
    seed = field_value(body, "seed", int, "seed", default=defaults.seed)
    if seed is not None and not 0 <= seed < 2**63:
        raise bad_request("seed", "'seed' must be a non-negative 63-bit integer", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stops = list(defaults.stop or [])
    else:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_request("stop", "'stop' must be a non-empty string or an array of them", "wrong_type")
        if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
            raise bad_request(
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


def parse_stream(body: Mapping) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage`` (OpenAI): (stream, usage in the last chunk)."""
    stream = field_value(body, "stream", bool, "stream", default=False)
    opts = field_value(body, "stream_options", dict, "stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad_request("stream_options", "'stream_options' is only allowed when 'stream' is true", "invalid_value")
    unknown = sorted(set(opts) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise bad_request("stream_options", f"'stream_options': unknown field(s) {unknown}", "unknown_field")
    usage = field_value(opts, "include_usage", bool, "stream_options.include_usage", default=False)
    return stream, usage
