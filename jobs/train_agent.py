#!/usr/bin/env python
"""Train the role-playing agent (supervised fine-tuning of a VLM on the prepared MMRole samples).

    python jobs/train_agent.py --config configs/smoke_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train_agent.py --config configs/agent_7b_8gpu.yaml \\
        output_dir=/mnt/shared/runs data.prepared=/mnt/shared/prepared run_name=agent-7b

Without a cluster address ($RAY_ADDRESS or ray.address=...) an embedded local Ray is started. Running the same
command again with the same run_name resumes the run from its last committed checkpoint.
"""

from __future__ import annotations

import sys

from mmrole.train.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], kind="agent"))
