#!/usr/bin/env python
"""Build DPO preference pairs from the judge: K sampled answers per training prompt, scored against the ground truth.

    python jobs/build_preferences.py --config configs/preferences_smoke_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/build_preferences.py --config CONFIG [key=value ...]

For each prepared training sample (``data.prepared``, ``data.split``, the first ``data.max_rows``) the agent samples
``samples_per_prompt`` answers (Ray Data over ``agent_pool``; seeded per prompt by ``generation.seed``, so a rerun
gives the same answers), the judge scores each on ``metrics`` (``judge.kind``: local reward model, ``serve``
endpoint or ``openai``-compatible API, as in jobs/score_answers.py), and the best and worst scored answers become
the (chosen, rejected) pair. Writes ``out`` as a prepared folder whose ``pref_train`` split jobs/train_dpo.py
reads, plus pairs.jsonl, candidates.jsonl, rejects.jsonl (too-long prompts, failed judge replies, ties) and
summary.json (in/out/rejected counts with reasons; ``ok`` false when more than ``max_reject_ratio`` is rejected).
Exit code 1 when not ok.
"""

from __future__ import annotations

import json
import sys

from mmrole.config_cli import job_config_from_argv
from mmrole.rl.preferences import PreferenceJobConfig


def main(argv=None) -> int:
    cfg, exit_code = job_config_from_argv(PreferenceJobConfig, argv, __doc__, "samples_per_prompt=8")
    if cfg is None:
        return exit_code
    from dataclasses import asdict

    print("resolved config:\n" + json.dumps(asdict(cfg), indent=2, default=str), flush=True)
    from mmrole.ray_env import init_ray
    from mmrole.ray_preferences import run_preferences

    summary = run_preferences(cfg, start_ray=lambda: init_ray(cfg.ray_address))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
