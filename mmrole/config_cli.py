"""``mmrole config show FILE [key=value ...]``: a config file as the job or Serve app that reads it sees it.

The kind (train, generate, score, serve, dpo, grpo, preferences, converse, datagen) is read from the file's keys, or given with ``--kind``. Every kind is
built by the one config system (:mod:`mmrole.config`), so an error reads ``config error: <dotted.key>: <what>``
(exit code 2), exactly as the job would print it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import yaml

from mmrole.config import (
    ConfigError,
    apply_overrides,
    build_dataclass,
    config_error_message,
    config_to_yaml,
    read_yaml_mapping,
    resolve_paths,
)

KINDS = ("train", "generate", "score", "serve", "dpo", "grpo", "preferences", "converse", "datagen")


def detect_kind(d: dict) -> str:
    """The config kind of a YAML mapping, from the keys only that kind has."""
    if "applications" in d:
        return "serve"
    if "dpo" in d:
        return "dpo"
    if "grpo" in d:
        return "grpo"
    if "teacher" in d:
        return "datagen"
    if "samples_per_prompt" in d:
        return "preferences"
    if "run_name" in d or d.get("kind") in ("agent", "reward_model"):
        return "train"
    if "partner" in d:
        return "converse"
    if "agent" in d:
        return "generate"
    if "judge" in d or "eval_dir" in d:
        return "score"
    raise ConfigError(f"<top level>: cannot tell the config kind from the keys {sorted(d)}; pass --kind {KINDS}")


def _job_class(kind: str):
    if kind == "dpo":
        from mmrole.rl.dpo_config import DPOJobConfig

        return DPOJobConfig
    if kind == "grpo":
        from mmrole.rl.config import GRPOJobConfig

        return GRPOJobConfig
    if kind == "datagen":
        from mmrole.datagen.config import GenerateConfig

        return GenerateConfig
    if kind == "preferences":
        from mmrole.rl.preferences import PreferenceJobConfig

        return PreferenceJobConfig
    if kind == "train":
        from mmrole.train.config import TrainJobConfig

        return TrainJobConfig
    if kind == "converse":
        from mmrole.eval.converse_config import ConverseJobConfig

        return ConverseJobConfig
    from mmrole.eval.job_config import GenerateJobConfig, ScoreJobConfig

    return GenerateJobConfig if kind == "generate" else ScoreJobConfig


def _serve_app_class(import_path: str):
    from mmrole.serving import AgentAppConfig, AppConfig, JudgeAppConfig

    if "judge" in import_path:
        return JudgeAppConfig
    if "agent" in import_path:
        return AgentAppConfig
    return AppConfig


def show_serve(d: dict, overrides: list[str], source: str) -> str:
    """Each application's ``args`` built as its app config; overrides are ``<app name>.<key>=value``."""
    apps = d.get("applications") or []
    if not isinstance(apps, list):
        raise ConfigError(f"applications: expected a list (in {source})")
    by_name = {str(a.get("name", i)): a for i, a in enumerate(apps) if isinstance(a, dict)}
    for item in overrides:
        name, _, rest = item.partition(".")
        if name not in by_name or not rest:
            raise ConfigError(
                f"{item.split('=', 1)[0]}: override an app's args as <app>.<key>=value, apps {sorted(by_name)}"
            )
        by_name[name]["args"] = apply_overrides(dict(by_name[name].get("args") or {}), [rest])
    out = {}
    for name, app in by_name.items():
        cls = _serve_app_class(str(app.get("import_path", "")))
        cfg = build_dataclass(cls, dict(app.get("args") or {}), f"{source}, application {name!r}")
        out[name] = cfg.to_dict()
    return yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


def show(path: str, overrides: list[str], kind: str | None = None) -> str:
    """The resolved config of ``path`` (with overrides) as YAML; job configs get their paths made absolute."""
    d = read_yaml_mapping(path)
    kind = kind or detect_kind(d)
    if kind == "serve":
        return show_serve(d, overrides, path)
    from mmrole.config import load_config_file

    cfg = load_config_file(_job_class(kind), path, overrides)
    return config_to_yaml(resolve_paths(cfg))


def cmd_show(args) -> int:
    try:
        text = show(args.file, args.overrides, args.kind)
    except ConfigError as e:
        print(config_error_message(e), file=sys.stderr)
        return 2
    print(text, end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("config", help="show a config as a job or Serve app reads it")
    csub = p.add_subparsers(dest="config_command", required=True)
    s = csub.add_parser(
        "show",
        help="print the resolved config (types checked, defaults filled, paths made absolute)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("file", help="a YAML config (configs/, configs/eval/, serve/)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides (Serve configs: <app>.<key>=value)")
    s.add_argument("--kind", choices=KINDS, default=None, help="config kind (default: detected from the keys)")
    s.set_defaults(func=cmd_show)


def job_config_from_argv(cls, argv: Optional[list[str]], description: str, example: str):
    """The command line every config-driven job shares: ``--config FILE [--print-config] [key=value ...]``.

    Returns ``(config, None)`` to run the job, or ``(None, exit_code)``: 0 after ``--print-config``, 2 after a
    config error (printed as ``config error: <dotted.key>: <what is wrong>``). Relative paths are made absolute
    here, on the driver, because the Ray workers run elsewhere."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config")
    ap.add_argument(
        "--print-config", action="store_true", help="print the resolved config (paths made absolute) and exit"
    )
    ap.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    args = ap.parse_args(argv)
    from mmrole.config import load_config_file

    try:
        cfg = resolve_paths(load_config_file(cls, args.config, args.overrides))
    except ConfigError as e:
        print(config_error_message(e), file=sys.stderr)
        return None, 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return None, 0
    return cfg, None
