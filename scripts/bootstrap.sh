#!/usr/bin/env bash
# Creates .venv (if missing) and installs mmrole with what the caller needs.
# Usage: scripts/bootstrap.sh [extras]   e.g. scripts/bootstrap.sh test,plots
# On machines without an NVIDIA GPU the CPU build of torch is installed first, so that
# pip never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=.venv/.mmrole-installed-${EXTRAS//,/_}
# Reinstall only when the project metadata changed since the last install.
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch>=2.4"
  else
    # CPU wheel: torch==2.13.0 resolves to a local CPU build here; elsewhere use PyTorch's CPU index.
    "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null \
      || "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if [ -n "$EXTRAS" ]; then
  "$VPY" -m pip install -q -e ".[$EXTRAS]"
else
  "$VPY" -m pip install -q -e .
fi
touch "$STAMP"
