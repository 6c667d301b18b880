#!/usr/bin/env bash
# The main job, end to end on an embedded local Ray with the demo data and tiny models.
# Extra arguments go to jobs/run_demo.py (e.g. --out demo_out --fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh plots
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python jobs/run_demo.py "$@"
