#!/usr/bin/env python
"""Train the role-playing agent with online GRPO: rollouts from the current policy, rewards from the judge (the
MMRole-Eval ratio) and/or rule rewards, group-normalised advantages, clipped objective + KL to the reference.

    python jobs/train_grpo.py --config configs/grpo_smoke_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train_grpo.py --config configs/grpo_7b_8gpu.yaml \\
        output_dir=/mnt/shared/runs data.prepared=/mnt/shared/prepared

Running the same command again with the same run_name resumes the run from its last committed checkpoint. The
last line is a JSON summary; "ok": false when failed rewards exceed grpo.max_failed_share (exit status 1).
"""

from __future__ import annotations

import sys


def _grpo_verdict(cfg):
    from mmrole.ray_grpo_recipe import grpo_verdict

    return grpo_verdict(cfg.grpo.max_failed_share)


if __name__ == "__main__":
    from mmrole.rl.config import load_grpo_config
    from mmrole.train.cli import main

    sys.exit(
        main(
            sys.argv[1:],
            kind="agent",
            prog="train_grpo",
            what="the agent with online GRPO",
            loader=load_grpo_config,
            recipe_module="mmrole.ray_grpo_recipe",
            verdict=_grpo_verdict,
            print_summary=True,
        )
    )
