#!/usr/bin/env python
"""Single-GPU training throughput of a realistic-size random-weight Qwen2.5-VL (about 2.2B parameters) in bf16 with
packed micro-batches (8-16k tokens): several setups measured side by side in one process, printed as a Markdown
table of tokens/s, ratio to plain torch, MFU, step time and peak memory.

    python bench/bench_train_gpu.py [--configs torch:sdpa,ds2:sdpa,...] [--tokens 16384] [--sample-len 2048]
                                    [--steps 6] [--warmup 2] [--peak-tflops 989.4] [--json out.json]
    python bench/bench_train_gpu.py --dry-run-cpu     # same code path, tiny model, fp32 on CPU (checks the script)

A setup is ``ENGINE[:option...]``: ENGINE is ``torch`` (plain torch, bf16 parameters, fused AdamW) or ``ds0``..``ds3``
(DeepSpeed ZeRO stage, the engine of mmrole.ray_train in one process: bf16 with fp32 master weights, client AdamW).
Options: ``sdpa`` | ``fa2`` | ``eager`` (attention; fa2 = flash-attention 2 varlen, needs the flash_attn package),
``liger`` (Liger kernels: RMSNorm, SwiGLU, RoPE and the fused linear cross-entropy that never materialises the
16k x 152k logits; needs liger_kernel), ``ckpt`` (activation checkpointing), ``bucket=N`` (DeepSpeed reduce /
allgather bucket, elements), ``nooverlap`` (DeepSpeed overlap_comm off), ``pad`` (the same samples as a padded
batch instead of one packed row). A setup whose package is missing is reported as skipped, not dropped.

Samples: lengths drawn uniformly in [0.5, 1.5] x --sample-len (seed 0), each <vision_start> + the image tokens of one
--image-size image + <vision_end> + text, packed in order into one row of at most --tokens tokens (position ids
restart per sample, so attention never crosses samples: varlen flash-attention with fa2, a block-diagonal mask with
sdpa). All text tokens are supervised but each sample's first one.

MFU = model FLOPs / step time / peak dense bf16 FLOP/s of the GPU (H100/H200 SXM: 989.4 TFLOP/s; --peak-tflops
overrides). Model FLOPs count only useful work, forward + backward (recomputation from checkpointing not counted):
6 x (language-model parameters + LM head) per real token (the input embedding is a lookup); attention within each
sample only and causal: 6 x layers x hidden x sum(s_i^2) (the PaLM convention, 12 x layers x hidden x s^2 over the
full square, is printed too); the vision tower 6 x block parameters per patch + 6 x merger parameters per merged
token + 12 x hidden x attended pairs (full attention per image in full blocks, 64-patch windows otherwise).
Padding in ``pad`` setups is computed but not counted.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrole.ray_env import default_torch_extensions_dir  # noqa: E402

# DeepSpeed JIT-builds its ops (CPU: the shm comm op) into this cache; one per venv avoids rebuilds.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())

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

    if args.dry_run_cpu:
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


DEFAULT_CONFIGS = (
    "torch:sdpa,ds2:sdpa,torch:fa2,ds2:fa2,ds2:fa2:liger,ds2:fa2:liger:bucket=200000000,ds2:fa2:liger:ckpt"
)


@dataclass
class Setup:
    spec: str
    engine: str = "torch"  # torch | ds
    zero: int = 2
    attn: str = "sdpa"
    liger: bool = False
    ckpt: bool = False
    bucket: int | None = None
    overlap: bool = True
    pad: bool = False


def parse_setup(spec: str) -> Setup:
    """``ENGINE[:option...]`` -> Setup; raises SystemExit naming the bad part."""
    parts = spec.strip().split(":")
    s = Setup(spec.strip())
    eng = parts[0]
    if eng == "torch":
        s.engine = "torch"
    elif eng in ("ds0", "ds1", "ds2", "ds3"):
        s.engine, s.zero = "ds", int(eng[2])
    else:
        raise SystemExit(f"--configs {spec!r}: engine {eng!r} must be torch or ds0..ds3")
    attn = {"sdpa": "sdpa", "fa2": "flash_attention_2", "eager": "eager"}
    for opt in parts[1:]:
        if opt in attn:
            s.attn = attn[opt]
        elif opt == "liger":
            s.liger = True
        elif opt == "ckpt":
            s.ckpt = True
        elif opt == "pad":
            s.pad = True
        elif opt == "nooverlap":
            s.overlap = False
        elif opt.startswith("bucket="):
            s.bucket = int(float(opt.split("=", 1)[1]))
        else:
            raise SystemExit(f"--configs {spec!r}: unknown option {opt!r}")
    if s.engine == "torch" and (s.bucket or not s.overlap):
        raise SystemExit(f"--configs {spec!r}: bucket/nooverlap are DeepSpeed options")
    return s


def missing_package(s: Setup) -> str | None:
    if s.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn not installed"
    if s.liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not installed"
    return None


def sample_lengths(args, n_img: int) -> list[int]:
    """Sample lengths (tokens) filling one micro-batch of at most --tokens tokens, in order."""
    rng = random.Random(0)
    out: list[int] = []
    lo = max(n_img + 10, int(0.5 * args.sample_len))
    hi = max(lo, int(1.5 * args.sample_len))
    while True:
        n = rng.randint(lo, hi)
        if sum(out) + n > args.tokens:
            break
        out.append(n)
    if not out:
        raise SystemExit(f"--tokens {args.tokens} holds no sample of length >= {lo}")
    return out


def make_samples(cfg, args, lengths: list[int]) -> tuple[list[dict], dict]:
    """One dict per sample: input_ids, labels (image tokens and the first token unsupervised), token types, pixels."""
    import torch

    side = args.image_size // 14
    side -= side % 2
    patches = side * side
    n_img = patches // 4
    g = torch.Generator().manual_seed(0)
    vocab = min(cfg.text_config.vocab_size, 150000) - 10
    out = []
    for n in lengths:
        text = torch.randint(0, vocab, (n - n_img - 2,), generator=g)
        ids = torch.cat(
            [
                torch.tensor([cfg.vision_start_token_id]),
                torch.full((n_img,), cfg.image_token_id),
                torch.tensor([cfg.vision_end_token_id]),
                text,
            ]
        )
        labels = ids.clone()
        labels[ids == cfg.image_token_id] = -100
        labels[0] = -100  # no sample's first token is predicted (in a packed row its predecessor is another sample)
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "mm_token_type_ids": (ids == cfg.image_token_id).long(),
                "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=g),
                "image_grid_thw": torch.tensor([[1, side, side]]),
            }
        )
    return out, {"patches": patches, "image_tokens": n_img}


def packed_batch(model, samples: list[dict], device, dtype) -> dict:
    """One row: per-sample M-RoPE positions plus a text position row restarting at 0 (what VLM.pack_batch does)."""
    import torch

    text_pos, mrope = [], []
    for e in samples:
        pos, _ = model.model.get_rope_index(
            e["input_ids"][None], mm_token_type_ids=e["mm_token_type_ids"][None], image_grid_thw=e["image_grid_thw"]
        )
        mrope.append(pos)
        text_pos.append(torch.arange(len(e["input_ids"]))[None, None])
    batch = {
        "input_ids": torch.cat([e["input_ids"] for e in samples])[None],
        "labels": torch.cat([e["labels"] for e in samples])[None],
        "mm_token_type_ids": torch.cat([e["mm_token_type_ids"] for e in samples])[None],
        "position_ids": torch.cat([torch.cat(text_pos, dim=2), torch.cat(mrope, dim=2)], dim=0),
        "pixel_values": torch.cat([e["pixel_values"] for e in samples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in samples]),
    }
    return _to(batch, device, dtype) | {"use_cache": False}


def padded_batch(cfg, samples: list[dict], device, dtype) -> dict:
    import torch

    width = max(len(e["input_ids"]) for e in samples)

    def pad(k: str, value: int):
        return torch.stack([torch.nn.functional.pad(e[k], (0, width - len(e[k])), value=value) for e in samples])

    batch = {
        "input_ids": pad("input_ids", 0),
        "labels": pad("labels", -100),
        "mm_token_type_ids": pad("mm_token_type_ids", 0),
        "attention_mask": torch.stack([(torch.arange(width) < len(e["input_ids"])).long() for e in samples]),
        "pixel_values": torch.cat([e["pixel_values"] for e in samples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in samples]),
    }
    return _to(batch, device, dtype) | {"use_cache": False}


def _to(batch: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def count_params(model) -> dict:
    def is_vis(n: str) -> bool:
        return ".visual." in f".{n}" or n.startswith("visual.")

    vis = sum(p.numel() for n, p in model.named_parameters() if is_vis(n))
    merger = sum(p.numel() for n, p in model.named_parameters() if is_vis(n) and ".merger." in f".{n}")
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {
        "total": total,
        "vision": vis,
        "vision_merger": merger,
        "embedding": emb,
        "lm_non_embedding": total - vis - emb,
    }


def model_flops(cfg, params: dict, lengths: list[int], patches: int) -> tuple[float, float]:
    """(useful FLOPs of one step, the same with PaLM-convention full-square attention), forward + backward."""
    t, v = cfg.text_config, cfg.vision_config
    h, layers = t.hidden_size, t.num_hidden_layers
    tokens = sum(lengths)
    dense = 6 * (params["lm_non_embedding"] + t.vocab_size * h) * tokens  # LM head: tied, but a real matmul
    sq = sum(n * n for n in lengths)
    attn_causal = 6 * layers * h * sq
    attn_palm = 12 * layers * h * sq
    n_img = len(lengths)
    blocks = params["vision"] - params["vision_merger"]
    window = min(patches, (v.window_size // v.patch_size) ** 2)
    full = len(v.fullatt_block_indexes)
    pairs = full * patches * patches + (v.depth - full) * patches * window
    vit = n_img * (6 * blocks * patches + 6 * params["vision_merger"] * patches // 4 + 12 * v.hidden_size * pairs)
    return float(dense + attn_causal + vit), float(dense + attn_palm + vit)


def peak_tflops(name: str, override) -> float | None:
    if override:
        return float(override)
    for key, val in PEAK_TFLOPS:
        if key in name:
            return val
    return None


def apply_liger(model) -> None:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


def run_setup(s: Setup, args, cfg, lengths, device, dtype) -> dict:
    """Build the model for one setup, train --warmup + --steps steps on the same micro-batch, time them."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmrole.train.ds_config import split_decay

    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=s.attn)
    model.train()
    if s.liger:
        apply_liger(model)
    if s.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = count_params(model)
    build_s = time.time() - t0
    samples, shape = make_samples(cfg, args, lengths)
    batch = padded_batch(cfg, samples, device, dtype) if s.pad else packed_batch(model, samples, device, dtype)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay, no_decay = split_decay((n, p.ndim) for n, p in named)
    by = dict(named)
    groups = [
        {"params": [by[n] for n in decay], "weight_decay": 0.05},
        {"params": [by[n] for n in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    engine = None
    if s.engine == "ds":
        import deepspeed

        from mmrole.train.config import TrainSettings, batch_geometry
        from mmrole.train.ds_config import build_deepspeed_config

        ts = TrainSettings(
            micro_batch_size=1,
            global_batch_size=1,
            zero_stage=s.zero,
            precision="bf16" if device.type == "cuda" else "fp32",
        )
        ds_cfg = build_deepspeed_config(ts, batch_geometry(1, 1, 1), device.type)
        z = ds_cfg["zero_optimization"]
        if s.bucket and s.zero >= 1:
            z["reduce_bucket_size"] = s.bucket
            if "allgather_bucket_size" in z:
                z["allgather_bucket_size"] = s.bucket
        if not s.overlap:
            z["overlap_comm"] = False
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)

        def step():
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            return loss.detach()
    else:

        def step():
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses = []
    for _ in range(args.warmup):
        losses.append(step())
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t)
    st = statistics.median(times)
    useful, palm = model_flops(cfg, params, lengths, shape["patches"])
    computed = len(lengths) * max(lengths) if s.pad else sum(lengths)
    res = {
        "setup": s.spec,
        "status": "ok",
        "step_s": st,
        "tokens_per_s": sum(lengths) / st,
        "computed_tokens": computed,
        "real_tokens": sum(lengths),
        "samples": len(lengths),
        "model_flops": useful,
        "model_flops_palm": palm,
        "tflops": useful / st / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "losses": [float(x) for x in losses],
        "build_s": build_s,
        "params": params,
    }
    engine = model = opt = batch = None  # free this setup before the next one is built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def table(results: list[dict], peak: float | None) -> list[str]:
    base = next((r for r in results if r["status"] == "ok" and r["setup"].startswith("torch")), None)
    head = ["setup", "tokens/s", "x torch", "MFU", "MFU (PaLM conv.)", "step", "peak mem", "loss", "status"]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["setup"], "-", "-", "-", "-", "-", "-", "-", r["status"]])
            continue
        st = r["step_s"]
        mfu = f"{100 * r['model_flops'] / st / (peak * 1e12):.1f}%" if peak else "n/a"
        palm = f"{100 * r['model_flops_palm'] / st / (peak * 1e12):.1f}%" if peak else "n/a"
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        loss = f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
        pad = (
            f", pad {r['computed_tokens'] / r['real_tokens']:.2f}x" if r["computed_tokens"] != r["real_tokens"] else ""
        )
        rows.append(
            [r["setup"], f"{r['tokens_per_s']:,.0f}", ratio, mfu, palm, f"{st * 1000:.0f} ms", mem, loss, "ok" + pad]
        )
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated setups (see above)")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per setup")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per packed micro-batch (upper bound)")
    ap.add_argument("--sample-len", type=int, default=2048, help="mean sample length, image tokens included")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vision-depth", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the GPU (for MFU)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny model, fp32, CPU: checks the script itself")
    args = ap.parse_args(argv)
    setups = [parse_setup(x) for x in args.configs.split(",") if x.strip()]

    import torch

    if not torch.cuda.is_available() and not args.dry_run_cpu:
        print(
            "bench_train_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Nothing was run. Use --dry-run-cpu to check the script, or "
            "bench/bench_train.py on CPU.",
            file=sys.stderr,
        )
        return 2
    if args.dry_run_cpu:
        args.image_size, args.tokens, args.sample_len = 56, min(args.tokens, 256), min(args.sample_len, 64)
        args.steps, args.warmup = min(args.steps, 1), min(args.warmup, 1)
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    device = torch.device("cuda", 0) if not args.dry_run_cpu else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if any(s.engine == "ds" for s in setups):
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", "29561")
    cfg = model_config(args)
    side = args.image_size // 14
    side -= side % 2
    lengths = sample_lengths(args, side * side // 4)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run, tiny model)"
    peak = peak_tflops(name, args.peak_tflops) if device.type == "cuda" else args.peak_tflops
    results = []
    for s in setups:
        why = missing_package(s)
        if why:
            results.append({"setup": s.spec, "status": f"skipped: {why}"})
            print(f"[bench] {s.spec}: skipped ({why})", flush=True)
            continue
        print(f"[bench] {s.spec} ...", flush=True)
        try:
            r = run_setup(s, args, cfg, lengths, device, dtype)
            results.append(r)
            # One line per setup as it finishes, so a run cut short by a timeout still leaves its figures.
            print(f"[bench] {s.spec}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.1f} TFLOP/s", flush=True)
        except Exception as e:  # one setup failing (OOM, a kernel refusing the shape) must not hide the others
            msg = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            results.append({"setup": s.spec, "status": msg})
            print(f"[bench] {s.spec}: {msg}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ok = [r for r in results if r["status"] == "ok"]
    p = ok[0]["params"] if ok else None
    print()
    print(f"device: {name}; peak used for MFU: {f'{peak:g} TFLOP/s dense bf16' if peak else 'unknown (--peak-tflops)'}")
    if p:
        unit, div = ("B", 1e9) if p["total"] >= 1e8 else ("M", 1e6)
        print(
            f"model: {p['total'] / div:.3f} {unit} parameters (LM {p['lm_non_embedding'] / div:.3f} {unit} + "
            f"embedding {p['embedding'] / div:.3f} {unit} + vision {p['vision'] / div:.3f} {unit}), "
            f"{str(dtype).replace('torch.', '')}"
        )
    print(
        f"micro-batch: {len(lengths)} samples packed into {sum(lengths)} tokens (budget {args.tokens}; sample lengths "
        f"{min(lengths)}-{max(lengths)}, each with one {args.image_size}px image); median of {args.steps} steps"
    )
    print()
    print("\n".join(table(results, peak)))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "peak_tflops": peak, "results": results}, indent=2))
    return 0 if ok or not setups else 1


if __name__ == "__main__":
    sys.exit(main())
