"""The one config system: typed dataclasses read from YAML, with ``key=value`` dotted overrides.

Training, evaluation, data generation and the Serve apps all build their configs here, so an unknown key or a
wrong type fails the same way everywhere: ``config error: <dotted.key>: <what is wrong>``. Every value is coerced
to its field's annotated type (command-line strings, YAML scalars, lists, nested dataclasses). No torch, Ray or
DeepSpeed here.
"""

from __future__ import annotations

import dataclasses
import os
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
        candidates = [a for a in args if a is not type(None)]
        shaped = None  # the error of the candidate whose shape fits the value (its message names the inner key)
        for a in candidates:
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                fits = (dataclasses.is_dataclass(a) and isinstance(value, dict)) or (
                    typing.get_origin(a) in (list, tuple) and isinstance(value, (list, tuple))
                )
                if len(candidates) == 1 or (fits and shaped is None):
                    shaped = e
        if shaped is not None:
            raise shaped
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
    """``cls(**d)`` with every field coerced to its type; unknown keys are an error naming ``prefix.key``.

    Errors read ``<dotted.key>: <what is wrong>``, followed by `` (in <source>)`` when a source is given."""
    try:
        return _build(cls, d, prefix)
    except ConfigError as e:
        if source:
            raise ConfigError(f"{e} (in {source})") from None
        raise


def _build(cls, d: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}

    def dotted(k: str) -> str:
        return f"{prefix}{'.' if prefix else ''}{k}"

    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping for {cls.__name__}, got {d!r}")
    unknown = sorted(set(d) - set(names))
    if unknown:
        keys = ", ".join(dotted(k) for k in unknown)
        raise ConfigError(f"{dotted(unknown[0])}: unknown key(s) {keys}; {cls.__name__} has {sorted(names)}")
    kw = {}
    for k, v in d.items():
        kw[k] = coerce(v, hints[k], dotted(k))
    missing = [
        n
        for n, f in names.items()
        if n not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(dotted(k) for k in missing)
        raise ConfigError(f"{dotted(missing[0])}: missing required key(s) {keys}")
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. VLMConfig's own checks
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


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


# ----------------------------------------------------------------------------------------------- paths
#
# Ray workers (Train workers, Data actors, Serve replicas) do not run in the driver's working directory, so a
# relative path in a config must become absolute on the driver before the config travels. Config dataclasses
# mark their path fields with ``path_field(kind=...)``; ``resolve_paths`` resolves every marked field.

PATH_KINDS = ("input", "output", "model")
_SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit`


def path_field(kind: str = "input", literals: tuple = (), **kwargs):
    """A dataclass field holding a filesystem path: ``input`` (read), ``output`` (written) or ``model`` (a local
    model dir, a Hugging Face hub id or ``tiny:<family>``). ``literals`` are values that are not paths (e.g.
    ``demo``); other keyword arguments go to ``dataclasses.field``."""
    if kind not in PATH_KINDS:
        raise ValueError(f"path kind must be one of {PATH_KINDS}, got {kind!r}")
    return dataclasses.field(metadata={"path": kind, "literals": tuple(literals)}, **kwargs)


def in_submitted_job() -> bool:
    """True in the driver of a ``ray job submit``: it runs in a temporary copy of the submitted working dir."""
    return bool(os.environ.get(_SUBMITTED_JOB_ENV))


def _looks_like_local_path(value: str, base: Path) -> bool:
    """For ``model`` paths: a hub id is ``name`` or ``namespace/name``; anything that exists locally, starts with
    ``./``, ``../``, ``~`` or ``/``, or has more than one ``/`` is a path."""
    if value.startswith("tiny:"):
        return False
    if value.startswith(("./", "../", "~", "/", ".\\", "..\\")) or value in (".", ".."):
        return True
    return value.count("/") > 1 or (base / value).exists()


def resolve_path(value: str, kind: str, key: str, base: Optional[Path] = None, submitted: Optional[bool] = None):
    """``value`` made absolute against ``base`` (default: the working directory); hub ids and ``tiny:`` specs
    are returned unchanged. In a submitted job a relative output, or a relative input missing from the job's
    working-dir copy, is a ConfigError naming ``key``."""
    if not value:
        return value
    base = Path(base) if base is not None else Path.cwd()
    if kind == "model" and not _looks_like_local_path(value, base):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    resolved = os.path.normpath(base / expanded)
    submitted = in_submitted_job() if submitted is None else submitted
    if submitted:
        exists = os.path.exists(resolved)
        if kind == "output" or not exists:
            why = "would be lost when the job ends" if kind == "output" else "does not exist"
            raise ConfigError(
                f"{key}: {value!r} is relative; under `ray job submit` the job runs in a temporary copy of the "
                f"working dir ({base}), where it {why}: give an absolute path on storage every node shares "
                f"(e.g. {key}=$PWD/{value})"
            )
    return resolved


def resolve_paths(cfg, base: Optional[Path] = None, submitted: Optional[bool] = None):
    """Resolve every ``path_field`` of the config dataclass ``cfg`` (and of its nested configs) in place, on the
    driver, so workers running elsewhere get absolute paths. Returns ``cfg``; one ConfigError lists every key
    that cannot be resolved."""
    errors: list[str] = []
    _resolve_into(cfg, base, submitted, "", errors)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def _resolve_into(cfg, base, submitted, prefix: str, errors: list[str]) -> None:
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{'.' if prefix else ''}{f.name}"
        kind = f.metadata.get("path")
        if kind and value in f.metadata.get("literals", ()):
            continue
        try:
            if kind and isinstance(value, str):
                setattr(cfg, f.name, resolve_path(value, kind, key, base, submitted))
            elif kind and isinstance(value, list):
                setattr(
                    cfg, f.name, [resolve_path(v, kind, f"{key}[{i}]", base, submitted) for i, v in enumerate(value)]
                )
            elif isinstance(value, list):  # a list of sections (e.g. converse's models)
                for i, v in enumerate(value):
                    _resolve_into(v, base, submitted, f"{key}[{i}]", errors)
            elif dataclasses.is_dataclass(value):
                _resolve_into(value, base, submitted, key, errors)
        except ConfigError as e:
            errors.append(str(e))


# ----------------------------------------------------------------------------------------------- CLI helpers


def config_error_message(err: ConfigError) -> str:
    """The one console format of a config error: ``config error: <dotted.key>: <what is wrong>``."""
    return f"config error: {err}"
