"""Command line of the training jobs (``jobs/train_agent.py``, ``jobs/train_reward_model.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from mmrole.config import config_error_message, resolve_paths

from .config import ConfigError, load_config

RECIPES = ("sft", "grpo")


def main(argv: Optional[list[str]] = None, kind: str = "agent", recipe: str = "sft") -> int:
    """``recipe``: ``sft`` (train_agent / train_reward_model) or ``grpo`` (train_grpo: a :class:`GRPOJobConfig`)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    what = {"sft": "role-playing agent" if kind == "agent" else "reward model", "grpo": "agent with online GRPO"}
    ap = argparse.ArgumentParser(
        prog="train_grpo" if recipe == "grpo" else f"train_{'agent' if kind == 'agent' else 'reward_model'}",
        description=f"Train the {what[recipe]} with Ray Train + "
        "DeepSpeed. Extra arguments are dotted overrides, e.g. train.lr=2e-5 run_name=x.",
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
        if recipe == "grpo":
            from mmrole.config import load_config_file
            from mmrole.rl.config import GRPOJobConfig

            cfg = resolve_paths(load_config_file(GRPOJobConfig, args.config, args.overrides, {"kind": kind}))
        else:
            cfg = resolve_paths(load_config(args.config, args.overrides, defaults={"kind": kind}))
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
        extra = {}
        if recipe == "grpo":
            from mmrole.ray_grpo_recipe import grpo_verdict, train_loop_per_worker

            extra = {"train_loop": train_loop_per_worker, "verdict": grpo_verdict(cfg.grpo.max_failed_share)}
        summary = run_training(cfg, quiet=not args.verbose, verbose=args.verbose, **extra)
        if recipe == "grpo":
            import json

            print(json.dumps({k: summary.to_dict()[k] for k in ("ok", "final_step", "error", "counts")}))
    except ConfigError as e:  # e.g. relative paths under `ray job submit`
        print(config_error_message(e), file=sys.stderr)
        return 2
    return 0 if summary.ok else 1
