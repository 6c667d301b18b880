#!/usr/bin/env python
"""Single-GPU training throughput of a realistic-size random-weight Qwen2.5-VL (about 2.2B parameters) in bf16:
prints tokens/s, samples/s, step time, peak memory and MFU.

    python bench/bench_train_gpu.py [--steps 10] [--seq-len 2048] [--image-size 448] [--micro-batch 2]
                                    [--engine deepspeed|torch] [--zero 2] [--grad-ckpt] [--peak-tflops 989]

Needs a CUDA GPU and refuses to run without one (``--smoke-cpu`` runs the same code path on CPU with a tiny model
and fp32, to check the script itself). Default shape: the Qwen2.5-VL-3B language model cut to 20 layers
(hidden 2048, MLP 11008, 16 heads / 2 KV heads, vocab 151936, tied embeddings) and its vision tower cut to 16
blocks (hidden 1280, window attention with full attention every 4th block); one 448x448 image per sample
(1024 patches -> 256 image tokens) plus text up to --seq-len tokens.

``--engine deepspeed`` (default) is the training stack of mmrole.ray_train (DeepSpeed ZeRO, bf16 with fp32
master weights, client torch AdamW) in one process; ``--engine torch`` is plain torch with bf16 parameters and
fused AdamW (pure bf16, no master weights) for comparison.

MFU = model FLOPs per second / peak dense bf16 FLOPs of the GPU. Model FLOPs per sample (forward + backward,
recomputation from gradient checkpointing not counted): 6 x (parameters used per token) x tokens for the
language model (the input embedding is a lookup and not counted; the LM head is), 6 x vision parameters x
patches for the vision tower, plus attention scores: 12 x layers x hidden x seq^2 (language model, full square as
in the usual MFU convention) and 12 x hidden x patches x attended patches per vision block.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Peak dense bf16 tensor FLOP/s by device-name substring (first match wins; --peak-tflops overrides).
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("4090", 165.2),
    ("V100", 125.0),
]
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653


def model_config(args):
    from transformers import Qwen2_5_VLConfig

    if args.smoke_cpu:
        text = dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            in_channels=3,
        )
        ids = dict(image_token_id=996, video_token_id=997, vision_start_token_id=998, vision_end_token_id=999)
    else:
        text = dict(
            vocab_size=151936,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        )
        depth = args.vision_depth
        vision = dict(
            depth=depth,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=args.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[i for i in range(depth) if i % 4 == 3],
            in_channels=3,
        )
        ids = dict(
            image_token_id=IMAGE_PAD,
            video_token_id=VIDEO_PAD,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def make_batch(cfg, args, device, dtype):
    """``micro_batch`` samples: <vision_start> image tokens <vision_end> + random text, all supervised but the
    image tokens; pixel values random (the vision tower's cost does not depend on their values)."""
    import torch

    side = args.image_size // 14
    side -= side % 2
    patches = side * side
    n_img = patches // 4
    text_len = args.seq_len - n_img - 2
    if text_len < 8:
        raise SystemExit(f"--seq-len {args.seq_len} leaves no room for text after {n_img} image tokens")
    g = torch.Generator().manual_seed(0)
    vocab = cfg.text_config.vocab_size
    rows = []
    for _ in range(args.micro_batch):
        text = torch.randint(0, min(vocab, 150000) - 10, (text_len,), generator=g)
        ids = torch.cat(
            [
                torch.tensor([cfg.vision_start_token_id]),
                torch.full((n_img,), cfg.image_token_id),
                torch.tensor([cfg.vision_end_token_id]),
                text,
            ]
        )
        rows.append(ids)
    input_ids = torch.stack(rows)
    labels = input_ids.clone()
    labels[input_ids == cfg.image_token_id] = -100
    mm = (input_ids == cfg.image_token_id).long()
    pix = torch.randn(patches * args.micro_batch, 3 * 2 * 14 * 14, generator=g)
    grid = torch.tensor([[1, side, side]] * args.micro_batch)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": mm,
        "pixel_values": pix,
        "image_grid_thw": grid,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch, {"patches": patches, "image_tokens": n_img, "text_tokens": text_len + 2, "seq": args.seq_len}


def count_params(model) -> dict:
    vis = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}" or n.startswith("visual."))
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "vision": vis, "embedding": emb, "lm_non_embedding": total - vis - emb}


def flops_per_sample(cfg, params: dict, shape: dict) -> float:
    t, v = cfg.text_config, cfg.vision_config
    s, h, layers = shape["seq"], t.hidden_size, t.num_hidden_layers
    lm_head = t.vocab_size * h  # tied with the embedding, but a real matmul
    lm = 6 * (params["lm_non_embedding"] + lm_head) * s + 12 * layers * h * s * s
    p = shape["patches"]
    window = min(p, (v.window_size // v.patch_size) ** 2)
    full = len(v.fullatt_block_indexes)
    vit = 6 * params["vision"] * p + 12 * v.hidden_size * p * (full * p + (v.depth - full) * window)
    return float(lm + vit)


def peak_tflops(name: str, override) -> float | None:
    if override:
        return float(override)
    for key, val in PEAK_TFLOPS:
        if key in name:
            return val
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compile)")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sample, image tokens included")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vision-depth", type=int, default=16)
    ap.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed")
    ap.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (less memory, ~1/3 more compute)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, eager)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the GPU (for MFU)")
    ap.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.smoke_cpu:
        print(
            "bench_train_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Nothing was run. On CPU use bench/bench_train.py.",
            file=sys.stderr,
        )
        return 2
    if args.smoke_cpu:
        args.image_size, args.seq_len, args.micro_batch = min(args.image_size, 56), min(args.seq_len, 64), 1
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    device = torch.device("cuda", 0) if not args.smoke_cpu else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = model_config(args)
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=args.attn)
    model.train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = count_params(model)
    build_s = time.time() - t0
    batch, shape = make_batch(cfg, args, device, dtype)

    from mmrole.train.ds_config import split_decay

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay, no_decay = split_decay((n, p.ndim) for n, p in named)
    by = dict(named)
    groups = [
        {"params": [by[n] for n in decay], "weight_decay": 0.05},
        {"params": [by[n] for n in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    if args.engine == "deepspeed":
        import deepspeed

        from mmrole.train.config import TrainSettings, batch_geometry
        from mmrole.train.ds_config import build_deepspeed_config

        for k, v in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29561"),
        ):
            os.environ.setdefault(k, v)
        ts = TrainSettings(
            micro_batch_size=args.micro_batch,
            global_batch_size=args.micro_batch,
            zero_stage=args.zero,
            precision="bf16" if device.type == "cuda" else "fp32",
        )
        ds_cfg = build_deepspeed_config(ts, batch_geometry(args.micro_batch, args.micro_batch, 1), device.type)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)

        def step():
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            return loss
    else:

        def step():
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    st = statistics.median(times)
    toks = args.micro_batch * shape["seq"]
    fl = flops_per_sample(cfg, params, shape) * args.micro_batch / st
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)"
    peak = peak_tflops(name, args.peak_tflops)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    rows = [
        ("device", name),
        (
            "engine",
            f"{args.engine}"
            + (f" ZeRO-{args.zero}" if args.engine == "deepspeed" else "")
            + f", {str(dtype).replace('torch.', '')}, attn={args.attn}"
            + (", grad ckpt" if args.grad_ckpt else ""),
        ),
        (
            "parameters",
            f"{params['total'] / 1e9:.3f} B (LM {params['lm_non_embedding'] / 1e9:.3f} B + embedding "
            f"{params['embedding'] / 1e9:.3f} B + vision {params['vision'] / 1e9:.3f} B)",
        ),
        (
            "batch",
            f"{args.micro_batch} x {shape['seq']} tokens ({shape['image_tokens']} image tokens from "
            f"{shape['patches']} patches per sample)",
        ),
        ("step time (median)", f"{st * 1000:.1f} ms over {args.steps} steps (model built in {build_s:.1f}s)"),
        (
            "tokens/s",
            f"{toks / st:,.0f} (text {args.micro_batch * shape['text_tokens'] / st:,.0f}, image "
            f"{args.micro_batch * shape['image_tokens'] / st:,.0f})",
        ),
        ("samples/s", f"{args.micro_batch / st:.2f}"),
        ("model TFLOP/s", f"{fl / 1e12:.1f}"),
        (
            "MFU",
            f"{100 * fl / (peak * 1e12):.1f}% of {peak:g} TFLOP/s"
            if peak
            else "unknown peak for this device: pass --peak-tflops",
        ),
        ("peak memory", f"{mem:.1f} GiB" if mem == mem else "n/a"),
        ("loss", f"{losses[0]:.3f} -> {losses[-1]:.3f}"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)} | {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
