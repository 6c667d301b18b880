"""Score a model's answers with a judge (MMRole-Eval): Ray Data over a pool of judge replicas (local reward
model), or bounded concurrency against an OpenAI-compatible API or our Serve /v1/score endpoint.

    python jobs/score_answers.py --config configs/eval/score_local.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/score_answers.py --config CONFIG [key=value ...]

One judge call per (sample, metric). Results go to an append-only store ``<out>/judge_results/<model>.jsonl``
(a rerun scores only the missing keys); when complete, writes ``<set>_reviews/<model>/``,
``<set>_results/<model>/`` (published formats) and the report (Markdown, CSV, JSON, plots) under
``<out>/report/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from mmrole.config import ConfigError, config_error_message, config_to_yaml, resolve_paths
from mmrole.eval.job_config import ScoreJobConfig, load_job_config


def write_report(out: Path, bootstrap: int, seed: int) -> str:
    """Aggregate the reviews under ``out`` (every model found) into ``out/report``; returns the Markdown."""
    from mmrole.eval.report import build_report, render_markdown
    from mmrole.eval.report import write_report as write

    report = build_report(out, bootstrap=bootstrap, seed=seed)
    write(report, out / "report")
    return render_markdown(report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config")
    ap.add_argument(
        "--print-config", action="store_true", help="print the resolved config (paths made absolute) and exit"
    )
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. judge.max_retries=1")
    args = ap.parse_args(argv)
    try:  # relative paths become absolute here, on the driver: the replicas run elsewhere
        cfg = resolve_paths(load_job_config(ScoreJobConfig, args.config, args.overrides))
    except ConfigError as e:
        print(config_error_message(e), file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    print("resolved config:\n" + json.dumps(asdict(cfg), indent=2, default=str), flush=True)
    from mmrole.ray_env import init_ray
    from mmrole.ray_eval import run_score

    init_ray(cfg.ray_address)
    run_score(cfg)
    if not cfg.swap:
        out = Path(cfg.out or cfg.eval_dir)
        print(write_report(out, cfg.bootstrap, cfg.seed), flush=True)
        print(f"report written to {out / 'report'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
