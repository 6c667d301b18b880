#!/usr/bin/env python
"""Train the reward model (the judge): the agent's training machinery on judge data (judge prompt -> review ending
in "[Scores]: (A, B)"), read from the prepared ``rm_train`` split.

    python jobs/build_rm_data.py --reviews EVAL_DIR --out DATASET_ROOT     # RM_data from judge reviews
    python -m mmrole.cli data prepare DATASET_ROOT PREPARED               # -> PREPARED/rm_train/*.parquet
    python jobs/train_reward_model.py --config configs/smoke_cpu_rm.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train_reward_model.py --config configs/reward_model_7b_8gpu.yaml \\
        output_dir=/mnt/shared/runs data.prepared=/mnt/shared/prepared
"""

from __future__ import annotations

import sys

from mmrole.train.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], kind="reward_model"))
