#!/usr/bin/env python
"""Train the agent on judge preferences with DPO (Ray Train + DeepSpeed; the SFT recipe's ingest, checkpoints,
exact resume, trackers and fail-fast).

    python jobs/train_dpo.py --config configs/dpo_smoke_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train_dpo.py --config configs/dpo_7b_8gpu.yaml \\
        output_dir=/mnt/shared/runs data.prepared=/mnt/shared/preferences model.model_path=/mnt/shared/sft-7b

``data.prepared`` is the output folder of jobs/build_preferences.py (split ``pref_train``: prompt, chosen reply
as ``target``, ``rejected`` reply). ``dpo.beta``, ``dpo.loss`` (sigmoid | ipo | sigmoid_norm) and
``dpo.reference`` (precomputed | online) choose the objective. Running the same command again resumes the run.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from mmrole.rl.dpo_config import load_dpo_config
    from mmrole.train.cli import main

    sys.exit(
        main(
            sys.argv[1:],
            kind="agent",
            prog="train_dpo",
            what="the agent on judge preferences (DPO)",
            loader=load_dpo_config,
            recipe_module="mmrole.ray_dpo_recipe",
        )
    )
