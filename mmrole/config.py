"""The one config system: typed dataclasses read from YAML, with ``key=value`` dotted overrides.

Training, evaluation, data generation and the Serve apps all build their configs here, so an unknown key or a
wrong type fails the same way everywhere: ``config error: <dotted.key>: <what is wrong>``. Every value is coerced
to its field's annotated type (command-line strings, YAML scalars, lists, nested dataclasses). No torch, Ray or
DeepSpeed here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the dotted key."""


# ----------------------------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to the annotated type ``tp`` (str from the command line, YAML scalars, lists)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not fit {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return build_dataclass(tp, value, "", where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls, d: dict, source: str = "", prefix: str = ""):
    """``cls(**d)`` with every field coerced to its type; unknown keys are an error naming ``prefix.key``."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    where = (source + ": ") if source else ""
    unknown = sorted(set(d) - set(names))
    if unknown:
        keys = ", ".join(f"{prefix}{'.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"{where}unknown key(s) {keys}; {cls.__name__} has {sorted(names)}")
    kw = {}
    for k, v in d.items():
        kw[k] = coerce(v, hints[k], f"{where}{prefix}{'.' if prefix else ''}{k}")
    missing = [
        n
        for n, f in names.items()
        if n not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(f"{prefix}{'.' if prefix else ''}{k}" for k in missing)
        raise ConfigError(f"{where}missing required key(s) {keys}")
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    except (TypeError, ValueError) as e:  # e.g. VLMConfig's own checks
        raise ConfigError(f"{where}{prefix or cls.__name__}: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=2e-5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set each ``dotted.key=value`` in the raw mapping (types are checked when the config is built)."""
    for item in overrides:
        path, value = parse_override(item)
        node = d
        for p in path[:-1]:
            if node.get(p) is None:  # e.g. model.lora.r=16 when lora is null
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
        node[path[-1]] = value
    return d


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; ConfigError naming the file when it cannot be read or is not a mapping."""
    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return loaded


def load_config_file(
    cls, path: Optional[str | Path], overrides: Optional[list[str]] = None, defaults: Optional[dict] = None
):
    """Build ``cls`` from a YAML file (or ``defaults``) and dotted ``key=value`` overrides: types coerced and
    checked, unknown keys refused, the dataclass's own ``__post_init__`` checks run."""
    d: dict = dict(defaults or {})
    source = "<overrides>"
    if path:
        source = str(path)
        d.update(read_yaml_mapping(path))
    apply_overrides(d, list(overrides or []))
    return build_dataclass(cls, d, source)


def config_to_yaml(cfg) -> str:
    """A config dataclass as YAML (``--print-config``)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
