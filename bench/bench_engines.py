#!/usr/bin/env python
"""The same requests through the HF engine (transformers ``generate``, our batching) and the vLLM engine, side by
side in one run: answering the demo test split, and judging 4 answers x 8 metrics. Needs vLLM (run it with
.venv-vllm/bin/python, made by scripts/bootstrap_vllm.sh; on GPUs an environment with the ``vllm`` extra).

    .venv-vllm/bin/python bench/bench_engines.py [--new-tokens 16] [--size auto|tiny|2b] [--model DIR]

Greedy. Requests/s of each engine after its load (load time listed apart), the ratio vLLM / HF, how many replies
are identical, and the vLLM settings. --size tiny (the default on CPU) is a test-size model widened to head_dim 32
(vLLM's CPU attention needs it); --size 2b (the default on CUDA) is bench_judge_prefix.py's ~2.2B random bf16
Qwen2.5-VL. In .venv-vllm the HF path runs with share_prefix off (its transformers is older than that path needs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _table import print_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--size", default="auto", choices=["auto", "tiny", "2b"])
    ap.add_argument("--model", default=None, help="a model dir instead of a generated one")
    ap.add_argument("--answers", type=int, default=4, help="answers judged (x 8 metrics)")
    ap.add_argument(
        "--eval-dir",
        default=os.environ.get("MMROLE_SAMPLE_DIR", str(REPO.parent / "shared" / "mmrole-sample")) + "/eval",
    )
    args = ap.parse_args()

    import torch

    from mmrole.data.demo import build_demo
    from mmrole.data.images import load_image
    from mmrole.data.prepare import prepare
    from mmrole.data.prepared import images_root, iter_samples
    from mmrole.eval.contract import build_judge_sample, expand_requests
    from mmrole.eval.template_loader import load_judge_template
    from mmrole.models import GenerationParams, VLMConfig, build_vlm, make_tiny_vlm
    from mmrole.models.engines import VLLMSettings
    from mmrole.models.vllm_engine import VLLMEngine

    cuda = torch.cuda.is_available()
    size = args.size if args.size != "auto" else ("2b" if cuda else "tiny")
    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    root = tmp / "MMRole_dataset"
    build_demo(root, seed=0)
    prepare(root, tmp / "prepared")
    samples = list(iter_samples(tmp / "prepared", "test"))
    img_root = images_root(tmp / "prepared")
    images = [load_image(img_root, s.image) for s in samples]
    model = args.model
    if model is None:
        model = str(make_tiny_vlm(tmp / "tiny", family="qwen2_5_vl", seed=0, hidden=128))
        if size == "2b":
            from bench_judge_prefix import make_2b

            model = str(make_2b(Path(model), tmp / "2b"))
    # judge requests: published test answers (gpt-4-turbo's), 8 metrics each, Pillow stand-ins for the images
    from PIL import Image

    from mmrole.eval.pipeline import load_answers_dir

    judged, _ = load_answers_dir(args.eval_dir, "gpt-4-turbo")
    judged = [a for a in judged if a.answer.strip()][: args.answers]
    template = load_judge_template()
    requests = expand_requests(judged)
    judge_samples = [build_judge_sample(r, template) for r in requests]
    stand_in: dict = {}
    judge_images = [
        stand_in.setdefault(r.image, Image.new("RGB", (224, 168), (len(r.image) * 7 % 255, 90, 160))) for r in requests
    ]
    dtype = "bfloat16" if cuda else "float32"
    dev = "cuda" if cuda else "cpu"
    cfg = VLMConfig(model_path=model, device=dev, dtype=dtype, max_length=4096, share_prefix=False)
    params = GenerationParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    settings = VLLMSettings(max_num_seqs=64, kv_cache_space_gb=2)
    rows, replies = [], {}
    for name, build in (("hf", lambda: build_vlm(cfg)), ("vllm", lambda: VLLMEngine(cfg, settings))):
        t0 = time.perf_counter()
        eng = build()
        load = time.perf_counter() - t0
        out = {}
        for task, ss, ims in (("answer", samples, images), ("judge", judge_samples, judge_images)):
            enc = [e for e in eng.encode_prompts(ss, ims, params) if not isinstance(e, Exception)]  # too long: out
            eng.generate_encoded(enc[:2], params)  # warm-up
            t0 = time.perf_counter()
            texts = eng.generate_encoded(enc, params)
            dt = time.perf_counter() - t0
            out[task] = (len(enc) / dt, texts)
        replies[name] = out
        rows.append((f"{name}: load (s)", f"{load:.1f}"))
        del eng
    for task in ("answer", "judge"):
        hf, vl = replies["hf"][task], replies["vllm"][task]
        n = len(hf[1])
        same = sum(a == b for a, b in zip(hf[1], vl[1]))
        rows += [
            (f"{task} ({n} requests): hf req/s", f"{hf[0]:.2f}"),
            (f"{task}: vllm req/s", f"{vl[0]:.2f}"),
            (f"{task}: vllm / hf", f"{vl[0] / hf[0]:.2f}x"),
            (f"{task}: identical replies", f"{same}/{n}"),
        ]
    rows.append(("model", f"{size} ({model}), {dtype}, {'CUDA' if cuda else 'CPU'}, {args.new_tokens} new tokens"))
    rows.append(("vllm settings", str(asdict(settings))))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
