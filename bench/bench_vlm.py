"""Benchmark of the VLM layer on a tiny random-weight model (no downloads).

1. Collation throughput on one core: samples -> padded tensors (tokens/s, samples/s), for our native Qwen path and
   for the generic path (the HF processor call) on the same processor, for comparison.
2. Greedy generation: one left-padded batch vs one sample at a time (same replies, fixed reply length).

    .venv/bin/python bench/bench_vlm.py [--family qwen2_5_vl] [--n 256] [--gen-n 32] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402


def _samples(n: int, seed: int):
    import numpy as np

    from mmrole.data.records import Sample
    from mmrole.models.tiny import tiny_image

    rng = np.random.default_rng(seed)
    words = "the old castle stands by the silver river under a dark sky and the young wizard looks at it".split()
    out, images = [], []
    for i in range(n):
        lines = [" ".join(rng.choice(words, size=int(rng.integers(8, 30)))) for _ in range(int(rng.integers(0, 8)))]
        head = "Here is the image. " + " ".join(rng.choice(words, size=int(rng.integers(10, 60)))) + "\n"
        s = Sample(
            id=f"b{i}",
            system="You are Harry Potter. " + " ".join(rng.choice(words, size=40)),
            user_text="",
            image=f"{i}.png",
            target=" ".join(rng.choice(words, size=int(rng.integers(10, 60)))),
            role="Harry Potter",
            other_role="human",
            script="Harry Potter",
            dialogue_type="human-role",
            k=1,
            prompt_head=head,
            history_header="History:\n",
            history_lines=[f"human: {x}" for x in lines],
            prompt_tail="\nYour reply:",
        )
        s.user_text = s.user_text_with_history()
        out.append(s)
        images.append(tiny_image(seed * 1000 + i, size=(int(rng.integers(96, 320)), int(rng.integers(96, 320)))))
    return out, images


def bench_collate(vlm, samples, images, batch_size: int, generic: bool = False, repeats: int = 3) -> dict:
    from mmrole.models.encoding import SampleEncoder

    enc = SampleEncoder(vlm.processor, "generic" if generic else vlm.family, vlm.cfg.max_length)
    for i in range(0, min(len(samples), 64), batch_size):  # warm-up (allocator, PIL and tokenizer caches)
        enc.collate(samples[i : i + batch_size], images[i : i + batch_size])
    enc.stats.text_tokens = 0
    times = []
    tokens = text_tokens = 0
    for _ in range(repeats):
        tokens = text_tokens = 0
        t0 = time.perf_counter()
        for i in range(0, len(samples), batch_size):
            batch, rejected = enc.collate(samples[i : i + batch_size], images[i : i + batch_size])
            assert not rejected, rejected
            tokens += int(batch["attention_mask"].sum())
        times.append(time.perf_counter() - t0)
    text_tokens = enc.stats.text_tokens // repeats
    t = statistics.median(times)
    return {
        "seconds": t,
        "samples_per_s": len(samples) / t,
        "tokens_per_s": tokens / t,
        "text_tokens_per_s": text_tokens / t,
        "tokens": tokens,
    }


def bench_generate(vlm, samples, images, batch_size: int, new_tokens: int) -> dict:
    from mmrole.models import GenerationParams

    # min_new_tokens = max_new_tokens: every reply has the same length, so both modes do the same work.
    p = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    vlm.generate(samples[:2], images[:2], p)  # warm-up
    t0 = time.perf_counter()
    batched = []
    for i in range(0, len(samples), batch_size):
        batched += vlm.generate(samples[i : i + batch_size], images[i : i + batch_size], p)
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [vlm.generate([s], [im], p)[0] for s, im in zip(samples, images)]
    ts = time.perf_counter() - t0
    n_tok = len(samples) * new_tokens
    return {
        "batched_s": tb,
        "single_s": ts,
        "batched_tok_per_s": n_tok / tb,
        "single_tok_per_s": n_tok / ts,
        "speedup": ts / tb,
        "same_replies": batched == single,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    ap.add_argument("--model", default=None, help="model dir (default: a fresh tiny model of --family)")
    ap.add_argument("--n", type=int, default=256, help="samples for the collation benchmark")
    ap.add_argument("--gen-n", type=int, default=32, help="samples for the generation benchmark")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-pixels", type=int, default=None, help="image budget (default: the model's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core for the tokenizer too
    from mmrole.models import VLMConfig, build_vlm, make_tiny_vlm

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        model = str(make_tiny_vlm(Path(tmp.name) / args.family, family=args.family))
    vlm = build_vlm(VLMConfig(model_path=model, device=args.device, max_pixels=args.max_pixels))
    samples, images = _samples(args.n, seed=0)
    native = bench_collate(vlm, samples, images, args.batch_size)
    generic = bench_collate(vlm, samples, images, args.batch_size, generic=True)
    gen = bench_generate(vlm, samples[: args.gen_n], images[: args.gen_n], args.batch_size, args.new_tokens)

    print(
        f"VLM layer benchmark: family={vlm.family} params={vlm.num_parameters():,} device={vlm.device} "
        f"torch_threads={args.threads}\n"
    )
    rows = [
        (
            f"collation, {name} ({args.n} samples, batch {args.batch_size}, median of 3)",
            f"{r['samples_per_s']:.0f} samples/s, {r['tokens_per_s']:.0f} tokens/s "
            f"({r['text_tokens_per_s']:.0f} text), {native['tokens'] / args.n:.0f} tokens/sample",
        )
        for name, r in (("native (ours)", native), ("generic (HF processor)", generic))
    ]
    rows += [
        (
            f"greedy generation, one by one ({args.gen_n} x {args.new_tokens} new tokens)",
            f"{gen['single_s']:.2f} s, {gen['single_tok_per_s']:.0f} new tok/s",
        ),
        (
            f"greedy generation, batched (bs={args.batch_size})",
            f"{gen['batched_s']:.2f} s, {gen['batched_tok_per_s']:.0f} new tok/s",
        ),
        ("batched / one by one", f"{gen['speedup']:.2f}x; identical replies: {gen['same_replies']}"),
    ]
    print_table(rows)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"native": native, "generic": generic, "generate": gen, "args": vars(args)}, indent=2)
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
