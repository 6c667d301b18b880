"""Score a model's answers with a judge (MMRole-Eval): Ray Data over a pool of judge replicas (local reward
model), or bounded concurrency against an OpenAI-compatible API or our Serve /v1/score endpoint.

    python jobs/score_answers.py --config configs/eval/score_local.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/score_answers.py --config CONFIG [key=value ...]

One judge call per (model, sample, metric); ``models=[a,b,...]`` scores several models in one run. Results go to
an append-only store ``<out>/judge_results/<model>.jsonl``, each stamped with a cache key of the judge, template,
generation parameters and answer text (a rerun scores only what is missing for this judge; ``retry_failed=true``
redoes failures); when complete, writes ``<set>_reviews/<model>/``,
``<set>_results/<model>/`` (published formats) and the report (Markdown, CSV, JSON, plots) under
``<out>/report/``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from mmrole.config_cli import job_config_from_argv
from mmrole.eval.job_config import ScoreJobConfig


def write_report(out: Path, bootstrap: int, seed: int) -> str:
    """Aggregate the reviews under ``out`` (every model found) into ``out/report``; returns the Markdown."""
    from mmrole.eval.report import build_report, render_markdown
    from mmrole.eval.report import write_report as write

    report = build_report(out, bootstrap=bootstrap, seed=seed)
    write(report, out / "report")
    return render_markdown(report)


def main(argv=None) -> int:
    cfg, exit_code = job_config_from_argv(ScoreJobConfig, argv, __doc__, "judge.max_retries=1")
    if cfg is None:
        return exit_code
    print("resolved config:\n" + json.dumps(asdict(cfg), indent=2, default=str), flush=True)
    from mmrole.ray_env import init_ray
    from mmrole.ray_eval import run_score

    # Ray starts only when there is work: a fully answered / scored run says so in a second.
    run_score(cfg, start_ray=lambda: init_ray(cfg.ray_address))
    if not cfg.swap:
        out = Path(cfg.out or cfg.eval_dir)
        # The report compares every model found under out (those scored now and any scored before).
        print(write_report(out, cfg.bootstrap, cfg.seed), flush=True)
        print(f"report written to {out / 'report'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
