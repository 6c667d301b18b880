#!/usr/bin/env bash
# The project's GPU checks in one short run, for a lent GPU machine that has torch (and most of the stack) but
# not every package of this project: wheels found in .whl/ (git-ignored) are installed into /tmp/site first.
# Fetch them here, for the device's Python 3.12 (its image has torch, peft and tokenizers, but no deepspeed):
#   P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64"
#   .venv/bin/python -m pip download --no-deps $P -d .whl transformers==5.24.0 hjson pydantic==2.14.4 \
#       pydantic-core==2.50.5 annotated-types typing-inspection liger-kernel
#   DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
# Writes its logs under $OUT (default /tmp/mmrole-gpu-checks). On the device tool: carry [".whl"].
#
#   bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/mmrole-gpu-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, deepspeed, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

# CUDA paths of the VLM layer: bf16 forward/backward/generate, fp32 batched and shared-prefix generation equal to
# one-by-one; the CPU generation tests run too (same code, now on a host with CUDA).
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k "cuda or shared_prefix or greedy" \
  2>&1 | tail -8 | tee "$OUT/pytest.txt"

# Training throughput of a ~2.2B Qwen2.5-VL shape with packed micro-batches (16k, then 8k tokens): plain torch vs
# DeepSpeed ZeRO-2 (the Ray Train stack's engine), sdpa vs flash-attention varlen, Liger kernels, bucket size,
# activation checkpointing; setups whose package is missing (flash_attn, liger_kernel) are listed as skipped.
# One Markdown table per run (tokens/s, x torch, MFU against 989.4 TFLOP/s dense bf16 on H100/H200).
echo "== bench_train_gpu.py --tokens 16384" | tee -a "$OUT/bench_train_gpu.txt"
timeout 330 python3 bench/bench_train_gpu.py --tokens 16384 --steps 6 --json "$OUT/bench_train_gpu_16k.json" 2>&1 \
  | grep -v -i warn | tail -16 | tee -a "$OUT/bench_train_gpu.txt"
echo "== bench_train_gpu.py --tokens 8192" | tee -a "$OUT/bench_train_gpu.txt"
timeout 150 python3 bench/bench_train_gpu.py --tokens 8192 --steps 6 --configs torch:sdpa,ds2:sdpa,ds2:fa2:liger \
  --json "$OUT/bench_train_gpu_8k.json" 2>&1 | grep -v -i warn | tail -10 | tee -a "$OUT/bench_train_gpu.txt"
