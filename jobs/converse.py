"""Whole-conversation evaluation: every model talks N turns with a partner (a simulated curious human, or the test
dialogue's other character) on each test item; the judge scores every agent turn in context and each whole
conversation (absolute 1-10 and/or pairwise between models on the same partner turns); then the report (score by
turn index, drift, repetition, win rates).

    python jobs/converse.py --config configs/eval/converse_tiny_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/converse.py --config CONFIG [key=value ...]

Conversations are Ray Data pipelines, one per turn, batched across conversations and models; every turn is stored
in ``<out>/converse/conversations/<model>.jsonl`` (append-only, keyed by who said it from which prompt), so a
stopped run resumes at the last finished turn. Judgements go to ``<out>/converse/judge_results/``, the report to
``<out>/converse/report/``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from mmrole.config_cli import job_config_from_argv
from mmrole.eval.converse_config import ConverseJobConfig


def main(argv=None) -> int:
    cfg, exit_code = job_config_from_argv(ConverseJobConfig, argv, __doc__, "turns=6")
    if cfg is None:
        return exit_code
    print("resolved config:\n" + json.dumps(asdict(cfg), indent=2, default=str), flush=True)
    from mmrole.ray_converse_judging import run_converse_job
    from mmrole.ray_env import init_ray

    # Ray starts only when there is work: a finished run writes its report in seconds.
    started = []

    def start_ray():
        if not started:
            init_ray(cfg.ray_address)
            started.append(True)

    run_converse_job(cfg, start_ray=start_ray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
