#!/usr/bin/env python
"""A local judge's generation for one answer's 8 metric prompts: one call per prompt (the original loop), one
left-padded batch, and the shared-prefix path (the 8 prompts differ only in their last lines, so the long common
prefix -- profiles, history, both answers -- is prefilled once); and the shared-prefix path over all answers in
one batch (what a judge batch of the scoring job does: every answer's group in one generate call).

    python bench/bench_judge_prefix.py [--answers 4] [--new-tokens 48] [--size auto|tiny|2b] [--eval-dir DIR]

Prompts: the project's judge template over published test answers (gpt-4-turbo's, from ../shared/mmrole-sample
or --eval-dir), Pillow stand-ins for the images. --size 2b (the default on CUDA) is a random-weight Qwen2.5-VL of
bench_train_gpu.py's ~2.2B shape in bf16 with the tiny model's tokenizer and special tokens; tiny (the default on
CPU) is the test-size model. Greedy, replies forced to --new-tokens tokens. The table counts replies identical to
the one-call path: all of them in fp32; in bf16 a random-weight model's near-tied logits flip some tokens on any
batched path (padded or shared) -- tests/test_models.py checks equality in fp32 on CPU and CUDA.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _table import print_table  # noqa: E402


def make_2b(tiny_dir: Path, out_dir: Path) -> Path:
    """The tiny model's files (tokenizer, processor, special-token ids) with ~2.2B random bf16 weights."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(tiny_dir)
    t, v = cfg.text_config, cfg.vision_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 2048, 11008, 20
    t.num_attention_heads, t.num_key_value_heads, t.max_position_embeddings = 16, 2, 32768
    t.layer_types = ["full_attention"] * 20
    t.rope_parameters = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
    v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size = 16, 1280, 3420, 16, 2048
    v.window_size, v.fullatt_block_indexes = 112, [3, 7, 11, 15]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    shutil.copytree(tiny_dir, out_dir, dirs_exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=4, help="answers judged (x 8 metric prompts)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--size", choices=("auto", "tiny", "2b"), default="auto")
    ap.add_argument(
        "--eval-dir",
        default=os.environ.get("MMROLE_SAMPLE_DIR", str(REPO.parent / "shared" / "mmrole-sample")) + "/eval",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image

    from mmrole.eval.contract import build_judge_sample, expand_requests
    from mmrole.eval.pipeline import load_answers_dir
    from mmrole.eval.template_loader import load_judge_template
    from mmrole.models import GenerationParams, VLMConfig, build_vlm, make_tiny_vlm

    cuda = torch.cuda.is_available()
    size = args.size if args.size != "auto" else ("2b" if cuda else "tiny")
    tmp = Path(tempfile.mkdtemp(prefix="mmrole-bench-judge-"))
    try:
        model_dir = make_tiny_vlm(tmp / "tiny", family="qwen2_5_vl", seed=1)
        if size == "2b":
            model_dir = make_2b(model_dir, tmp / "judge-2b")
        answers, _ = load_answers_dir(args.eval_dir, "gpt-4-turbo")  # read only: no copy needed
        answers = [a for a in answers if a.answer.strip()][: args.answers]
        template = load_judge_template()
        requests = expand_requests(answers)
        samples = [build_judge_sample(r, template) for r in requests]
        stand_in = {}
        images = [
            stand_in.setdefault(r.image, Image.new("RGB", (448, 336), (len(r.image) * 7 % 255, 90, 160)))
            for r in requests
        ]
        vlm = build_vlm(VLMConfig(model_path=str(model_dir), max_length=16384))
        params = GenerationParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        n_metrics = len(requests) // len(answers)
        tokens = [
            len(vlm.encode(s, im, with_target=False)["input_ids"])
            for s, im in zip(samples[:n_metrics], images[:n_metrics])
        ]

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def timed(fn):
            fn(slice(0, n_metrics))  # warm-up on the first answer
            sync()
            t0 = time.perf_counter()
            out = []
            for i in range(0, len(samples), n_metrics):
                out += fn(slice(i, i + n_metrics))
            sync()
            return out, time.perf_counter() - t0

        def one_by_one(sl):
            return [vlm.generate([s], [im], params)[0] for s, im in zip(samples[sl], images[sl])]

        def batch(sl, share: bool):
            vlm.cfg.share_prefix = share
            try:
                return vlm.generate(samples[sl], images[sl], params)
            finally:
                vlm.cfg.share_prefix = True

        alone, t_alone = timed(one_by_one)
        padded, t_padded = timed(lambda sl: batch(sl, False))
        shared, t_shared = timed(lambda sl: batch(sl, True))
        sync()
        t0 = time.perf_counter()
        together = batch(slice(0, len(samples)), True)
        sync()
        t_together = time.perf_counter() - t0
        n = len(samples)
        dev = torch.cuda.get_device_name(0) if cuda else "cpu"
        params_b = sum(p.numel() for p in vlm.model.parameters()) / 1e9
        same = (
            f"padded batch {sum(a == b for a, b in zip(alone, padded))}/{n}, "
            f"shared prefix {sum(a == b for a, b in zip(alone, shared))}/{n}, "
            f"all answers together {sum(a == b for a, b in zip(alone, together))}/{n}"
        )
        rows = [
            ("device / model", f"{dev} / {size} ({params_b:.2f} B, {str(next(vlm.model.parameters()).dtype)})"),
            (
                "prompts",
                f"{len(answers)} answers x {n_metrics} metrics; {min(tokens)}-{max(tokens)} tokens each, "
                f"{args.new_tokens} new tokens",
            ),
            ("one call per prompt", f"{n / t_alone:.2f} prompts/s"),
            ("one padded batch per answer", f"{n / t_padded:.2f} prompts/s ({t_alone / t_padded:.2f}x)"),
            (
                "shared prefix per answer",
                f"{n / t_shared:.2f} prompts/s ({t_alone / t_shared:.2f}x one call "
                f"per prompt, {t_padded / t_shared:.2f}x padded batch)",
            ),
            (
                f"shared prefix, {len(answers)} answers in one batch",
                f"{n / t_together:.2f} prompts/s ({t_alone / t_together:.2f}x one call per prompt)",
            ),
            ("replies identical to one call per prompt", same),
        ]
        if cuda:
            rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
        print_table(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
