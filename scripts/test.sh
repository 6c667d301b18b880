#!/usr/bin/env bash
# Runs the whole test suite (unit + Ray integration) in .venv, installing what it needs first.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not ray" -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test,plots,tracking
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
