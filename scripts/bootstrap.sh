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
# DeepSpeed JIT-compiles its shared-memory comm op (deepspeed_shm_comm) at the first deepspeed.initialize on CPU:
# 30-45 s of every fresh venv's first training run on 2 cores. Build it into the wheel at install time instead
# (DeepSpeed's DS_BUILD_SHM_COMM), once per DeepSpeed/torch/Python version: the wheel is kept in
# ~/.cache/mmrole/wheels, so later fresh clones install it in seconds. If the build fails (no C++ compiler), the
# JIT build at first use still works.
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } \
  && ! DS_ACCELERATOR=cpu "$VPY" -c "import sys; from deepspeed.git_version_info import installed_ops as o; sys.exit(0 if o.get('deepspeed_shm_comm') else 1)" 2>/dev/null; then
  TAG=$("$VPY" -c "import sys, torch, importlib.metadata as m; print(f\"{m.version('deepspeed')}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}\")")
  WHEELS="${MMROLE_WHEEL_CACHE:-$HOME/.cache/mmrole/wheels}/deepspeed-shm-$TAG"
  if ! ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "[bootstrap] building DeepSpeed's CPU shared-memory op once (about a minute; cached in $WHEELS)"
    mkdir -p "$WHEELS.tmp"
    if DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu "$VPY" -m pip wheel -q --no-deps --no-build-isolation \
      --no-cache-dir "deepspeed==${TAG%%-py*}" -w "$WHEELS.tmp"; then
      rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    else
      rm -rf "$WHEELS.tmp"
      echo "[bootstrap] warning: could not prebuild DeepSpeed's shm op; it is JIT-built at first use instead" >&2
    fi
  fi
  if ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
    "$VPY" -m pip install -q --no-deps --force-reinstall "$WHEELS"/deepspeed-*.whl
  fi
fi
touch "$STAMP"
