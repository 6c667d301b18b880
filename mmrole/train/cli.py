"""Command line of the training jobs (``jobs/train_agent.py``, ``jobs/train_reward_model.py``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, Optional

from mmrole.config import config_error_message, resolve_paths

from .config import ConfigError, load_config


def main(
    argv: Optional[list[str]] = None,
    kind: str = "agent",
    *,
    prog: Optional[str] = None,
    what: Optional[str] = None,
    loader: Callable = load_config,
    recipe_module: Optional[str] = None,
    verdict: Optional[Callable[[Any], Callable]] = None,
    print_summary: bool = False,
) -> int:
    """A training job's command line. ``loader`` builds its config (default: the SFT one); ``recipe_module`` names
    the module whose ``train_loop_per_worker`` is its recipe's loop (imported lazily: a finished run answers without
    Ray or torch); ``verdict`` (given the config) returns the run's verdict for :func:`run_training`;
    ``print_summary`` ends with a JSON line (ok, final step, error, counts)."""
    what = what or ("the role-playing agent" if kind == "agent" else "the reward model")
    ap = argparse.ArgumentParser(
        prog=prog or f"train_{'agent' if kind == 'agent' else 'reward_model'}",
        description=f"Train {what} with Ray Train + DeepSpeed. Extra arguments are dotted overrides, e.g. "
        "train.lr=2e-5 run_name=x.",
    )
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument(
        "--print-config", action="store_true", help="print the resolved config (paths made absolute) and exit"
    )
    ap.add_argument(
        "--verbose", action="store_true", help="show Ray, DeepSpeed and worker output (default: progress lines only)"
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    args = ap.parse_args(argv)
    try:
        # relative paths become absolute here, on the driver: the workers run elsewhere
        cfg = resolve_paths(loader(args.config, args.overrides, defaults={"kind": kind}))
        if cfg.kind != kind:
            raise ConfigError(f"kind: {cfg.kind!r} config ({args.config}); this job trains kind={kind!r}")
    except ConfigError as e:
        print(config_error_message(e), file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from .finished import finished_run

    done = finished_run(cfg)
    if done is not None:  # checked before importing Ray/torch: a finished run answers at once
        print(
            f"[mmrole] run {cfg.run_name} is already complete: step {done['final_step']}, model "
            f"{done['final_model']} ({cfg.run_dir}); nothing to do (change run_name or the config to train again)"
        )
        return 0
    from mmrole.ray_train import run_training  # imports ray/deepspeed/torch: only when actually training

    try:
        if not args.verbose:
            from mmrole.console import setup_console

            setup_console(False)
        extra: dict[str, Any] = {}
        if recipe_module is not None:
            import importlib

            extra["train_loop"] = importlib.import_module(recipe_module).train_loop_per_worker
        if verdict is not None:
            extra["verdict"] = verdict(cfg)
        summary = run_training(cfg, quiet=not args.verbose, verbose=args.verbose, **extra)
        if print_summary:
            import json

            print(json.dumps({k: summary.to_dict().get(k) for k in ("ok", "final_step", "error", "counts")}))
    except ConfigError as e:  # e.g. relative paths under `ray job submit`
        print(config_error_message(e), file=sys.stderr)
        return 2
    return 0 if summary.ok else 1
