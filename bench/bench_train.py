#!/usr/bin/env python
"""Training benchmark on a tiny random-weight Qwen2.5-VL (CPU is fine): prints a table and writes JSON.

1. Step time of Ray Train + DeepSpeed (1 worker, ZeRO-2, fp32) vs a plain single-process torch loop on the same
   model and the same micro-batches (ratio = framework overhead; both use 1 intra-op thread, as a Ray worker with
   <= 1 CPU does).
2. Fraction of step time blocked on data with the Ray Data pipeline (2 workers, ZeRO-2).
3. Peak memory per train worker, per encoder actor and of the whole run (sum of PSS over the driver and every
   process of the embedded Ray cluster), at 1x and at 10x the data: the pipeline streams, so memory must not grow
   with the dataset.
4. Padding waste (tokens computed / real tokens) on the length distribution of the shared MMRole sample
   (/work/shared/mmrole-sample, or $MMROLE_SAMPLE_DIR): its dialogues rendered by `mmrole data prepare`, the text
   tokenized by the tiny model's tokenizer (a locally trained BPE, so absolute lengths are an estimate of Qwen's),
   plus a fixed image-token count per sample (--image-tokens, default 391: a 640x480 COCO image at Qwen2.5-VL's
   default pixel budget is resized to 644x476 = 23 x 17 merged patches). Rows in a seeded shuffled order; padded
   micro-batches of b rows vs first-fit-decreasing packing into rows of max_length tokens, each pack counted at its
   full max_length (the worst case; varlen attention computes only the real tokens), planned over a streaming
   buffer of --pack-buffer rows. Target: packed <= 1.05.

    python bench/bench_train.py [--rows 64] [--scale 10] [--out runs/bench] [--padding-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _table import print_table  # noqa: E402

from mmrole.ray_env import default_torch_extensions_dir  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MB = 1024 * 1024


class MemoryMonitor:
    """Samples the driver and all its descendant processes (the embedded Ray cluster) once per ``interval``."""

    def __init__(self, interval: float = 1.0):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.peak_total_pss = 0
        self.peak_by_pid: dict[int, tuple[str, int, int]] = {}  # pid -> (role, peak rss, peak pss)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def role(cmd: str) -> str:
        if "RayTrainWorker" in cmd:
            return "train_worker"
        if "MapWorker" in cmd or "RowEncoder" in cmd:
            return "encoder_actor"
        if any(k in cmd for k in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py")):
            return "ray_system"
        return "other"

    def sample(self) -> int:
        me = self.psutil.Process()
        procs = [me] + me.children(recursive=True)
        total = 0
        for p in procs:
            try:
                mi = p.memory_full_info()
                cmd = " ".join(p.cmdline())[:200]
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            total += mi.pss
            role = "driver" if p.pid == me.pid else self.role(cmd)
            old = self.peak_by_pid.get(p.pid, (role, 0, 0))
            self.peak_by_pid[p.pid] = (role, max(old[1], mi.rss), max(old[2], mi.pss))
        self.peak_total_pss = max(self.peak_total_pss, total)
        return total

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def peaks(self, role: str) -> tuple[float, float]:
        """(max peak RSS, max peak PSS) in MiB over processes of ``role``."""
        vals = [(r, p) for ro, r, p in self.peak_by_pid.values() if ro == role]
        if not vals:
            return 0.0, 0.0
        return max(v[0] for v in vals) / MB, max(v[1] for v in vals) / MB


def plain_loop(model_dir: Path, prepared: Path, micro: int, lr: float, threads: int = 1) -> dict:
    """Single process, no Ray, no DeepSpeed: encode everything first, then time fwd + bwd + AdamW step."""
    import torch

    from mmrole.data.images import ImageError, load_image
    from mmrole.data.prepared import images_root, iter_samples
    from mmrole.models import VLMConfig, build_vlm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vlm = build_vlm(VLMConfig(model_path=str(model_dir), device="cpu", dtype="float32", max_length=1024))
    vlm.model.train()
    root = images_root(prepared)
    enc = []
    for s in iter_samples(prepared, "train"):
        try:
            enc.append(vlm.encode(s, load_image(root, s.image)))
        except (ImageError, ValueError):
            continue
    opt = torch.optim.AdamW([p for p in vlm.model.parameters() if p.requires_grad], lr=lr)
    times, losses = [], []
    for i in range(0, len(enc) - micro + 1, micro):
        batch = vlm.pad_batch(enc[i : i + micro])
        t0 = time.perf_counter()
        loss = vlm.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = times[2:] or times
    return {
        "steps": len(times),
        "median_step_s": statistics.median(steady),
        "mean_step_s": statistics.mean(steady),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def ray_run(
    name: str, out: Path, model_dir: Path, prepared: Path, workers: int, micro: int, lr: float, zero: int = 2
) -> dict:
    from mmrole.ray_train import run_training
    from mmrole.train.config import load_config
    from mmrole.train.metrics import read_metrics

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(
        repo / "configs" / "smoke_cpu.yaml",
        [
            f"run_name={name}",
            f"output_dir={out / 'runs'}",
            f"model.model_path={model_dir}",
            f"data.prepared={prepared}",
            "data.max_rows=null",
            "tiny_model=null",
            "train.epochs=1",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * workers}",
            f"train.lr={lr}",
            f"train.zero_stage={zero}",
            f"scaling.num_workers={workers}",
            "checkpoint.every_steps=1000000",
            "train.log_every=1000000",
            "data.prefetch_batches=4",
        ],
    )
    import shutil

    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    with MemoryMonitor(interval=1.0) as mon:
        t0 = time.time()
        summary = run_training(cfg, quiet=True)
        wall = time.time() - t0
    if not summary.ok:
        raise RuntimeError(f"{name}: training failed: {summary.error}")
    recs = read_metrics(cfg.run_dir)
    steps = [r for r in recs if "loss" in r and "event" not in r]
    steady = steps[1:] or steps  # the first step of the epoch waits for the pipeline to start
    st = [r["step_time_s"] for r in steady]
    wait = sum(r["data_wait_s"] for r in steady) / max(sum(st), 1e-9)
    wait_all = sum(r["data_wait_s"] for r in steps) / max(sum(r["step_time_s"] for r in steps), 1e-9)
    return {
        "name": name,
        "workers": workers,
        "rows": summary.counts["in"],
        "steps": len(steps),
        "wall_s": wall,
        "median_step_s": statistics.median(st),
        "data_wait_frac_steady": wait,
        "data_wait_frac_all": wait_all,
        "first_step_s": steps[0]["step_time_s"],
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "peak_worker_rss_mb": mon.peaks("train_worker")[0],
        "peak_worker_pss_mb": mon.peaks("train_worker")[1],
        "peak_encoder_rss_mb": mon.peaks("encoder_actor")[0],
        "peak_encoder_pss_mb": mon.peaks("encoder_actor")[1],
        "peak_total_pss_mb": mon.peak_total_pss / MB,
    }


def sample_lengths(out: Path, model_dir: Path, sample_dir: Path, image_tokens: int, seed: int = 0) -> list[int]:
    """Token lengths of the shared sample's rendered training samples (text by the tiny tokenizer + image tokens)."""
    import random

    from mmrole.data.prepare import PrepareConfig, prepare
    from mmrole.data.prepared import iter_samples
    from mmrole.models import VLMConfig
    from mmrole.models.encoding import SampleRejected, build_encoder

    prepared = out / "sample_prepared"
    if not (prepared / "manifest.json").is_file():
        prepare(sample_dir, prepared, PrepareConfig(require_images=False))  # the sample ships no images
    enc = build_encoder(VLMConfig(model_path=str(model_dir), max_length=10**9))
    lengths, rejected = [], 0
    for s in iter_samples(prepared, "train"):
        try:
            lengths.append(len(enc.encode(s, None)["input_ids"]) + image_tokens)
        except SampleRejected:
            rejected += 1
    if rejected:
        print(f"  {rejected} sample(s) of the shared sample could not be encoded and are left out", flush=True)
    random.Random(seed).shuffle(lengths)  # training sees a shuffled order
    return lengths


def padding_rows(lengths: list[int], buffer: int) -> list[tuple[str, str]]:
    """(setup, waste) rows: padded micro-batches vs packing, on the same rows."""
    from mmrole.train.lengths import packed_tokens, padded_tokens

    real = sum(lengths)
    rows = [(f"padded micro-batches of {b} rows", f"{padded_tokens(lengths, b) / real:.3f}") for b in (1, 2, 4, 8, 16)]
    for max_length in (8192, 16384):
        kept = [n for n in lengths if n <= max_length]
        for buf in (buffer, None):
            computed, packs = packed_tokens(kept, max_length, buf)
            where = f"buffer {buf} rows" if buf else "whole set"
            rows.append(
                (
                    f"packed into {max_length}-token rows, FFD over {where} ({packs} packs)",
                    f"{computed / sum(kept):.3f}",
                )
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="rows of the 1x dataset")
    ap.add_argument("--scale", type=int, default=10, help="size of the large dataset, in multiples of --rows")
    ap.add_argument("--out", default="runs/bench", help="work folder (data, model, runs, results JSON)")
    ap.add_argument("--lr", type=float, default=2e-3)
    default_sample = os.environ.get(
        "MMROLE_SAMPLE_DIR", str(Path(__file__).resolve().parents[2] / "shared/mmrole-sample")
    )
    ap.add_argument("--sample-dir", default=default_sample, help="the shared MMRole sample (padding waste)")
    ap.add_argument("--image-tokens", type=int, default=391, help="image tokens per sample (padding waste)")
    ap.add_argument("--pack-buffer", type=int, default=256, help="rows a streaming packer plans over")
    ap.add_argument("--padding-only", action="store_true", help="only the padding-waste table (no Ray run)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from mmrole.models import make_tiny_vlm
    from mmrole.train.synthetic import write_prepared

    model = make_tiny_vlm(out / "tiny-qwen2_5_vl", "qwen2_5_vl", seed=0)
    waste_rows = []
    if Path(args.sample_dir).is_dir():
        print("padding waste on the shared sample ...", flush=True)
        lengths = sample_lengths(out, model, Path(args.sample_dir), args.image_tokens)
        waste_rows = padding_rows(lengths, args.pack_buffer)
        q = sorted(lengths)
        print(
            f"\n{len(lengths)} samples, tokens per sample: min {q[0]}, median {q[len(q) // 2]}, "
            f"p95 {q[int(0.95 * (len(q) - 1))]}, max {q[-1]} (incl. {args.image_tokens} image tokens)\n"
        )
        print("padding waste = tokens computed / real tokens (target for packing: <= 1.05)")
        print_table(waste_rows)
    else:
        print(f"padding waste skipped: no shared sample at {args.sample_dir} (--sample-dir)", flush=True)
    if args.padding_only:
        return 0
    d1 = write_prepared(out / "data_1x", args.rows, seed=0)
    d10 = write_prepared(out / f"data_{args.scale}x", args.rows * args.scale, seed=0)
    results: dict = {
        "rows_1x": args.rows,
        "scale": args.scale,
        "cpu_count": os.cpu_count(),
        "padding_waste": waste_rows,
    }

    print("plain torch loop ...", flush=True)
    results["plain"] = plain_loop(model, d1, micro=2, lr=args.lr)

    import ray

    from mmrole.ray_env import init_ray

    init_ray(num_cpus=4)
    mon = MemoryMonitor()
    results["idle_ray_pss_mb"] = mon.sample() / MB
    print("ray 1 worker ...", flush=True)
    results["ray_1w"] = ray_run("bench-1w", out, model, d1, workers=1, micro=2, lr=args.lr)
    print("ray 2 workers, 1x ...", flush=True)
    results["ray_2w_1x"] = ray_run("bench-2w-1x", out, model, d1, workers=2, micro=2, lr=args.lr)
    print(f"ray 2 workers, {args.scale}x ...", flush=True)
    results["ray_2w_10x"] = ray_run(f"bench-2w-{args.scale}x", out, model, d10, workers=2, micro=2, lr=args.lr)
    ray.shutdown()

    p, r1, a, b = results["plain"], results["ray_1w"], results["ray_2w_1x"], results["ray_2w_10x"]
    rows = [
        ("plain torch loop (1 proc, micro 2)", f"{p['median_step_s'] * 1000:.0f} ms", "1.00", "-", "-", "-", "-"),
        (
            "Ray Train + DeepSpeed ZeRO-2, 1 worker",
            f"{r1['median_step_s'] * 1000:.0f} ms",
            f"{r1['median_step_s'] / p['median_step_s']:.2f}",
            f"{100 * r1['data_wait_frac_steady']:.1f}%",
            f"{r1['peak_worker_pss_mb']:.0f} ({r1['peak_worker_rss_mb']:.0f})",
            f"{r1['peak_encoder_pss_mb']:.0f} ({r1['peak_encoder_rss_mb']:.0f})",
            f"{r1['peak_total_pss_mb']:.0f}",
        ),
        (
            f"2 workers, {a['rows']} rows (1x)",
            f"{a['median_step_s'] * 1000:.0f} ms",
            f"{a['median_step_s'] / p['median_step_s']:.2f}",
            f"{100 * a['data_wait_frac_steady']:.1f}%",
            f"{a['peak_worker_pss_mb']:.0f} ({a['peak_worker_rss_mb']:.0f})",
            f"{a['peak_encoder_pss_mb']:.0f} ({a['peak_encoder_rss_mb']:.0f})",
            f"{a['peak_total_pss_mb']:.0f}",
        ),
        (
            f"2 workers, {b['rows']} rows ({args.scale}x)",
            f"{b['median_step_s'] * 1000:.0f} ms",
            f"{b['median_step_s'] / p['median_step_s']:.2f}",
            f"{100 * b['data_wait_frac_steady']:.1f}%",
            f"{b['peak_worker_pss_mb']:.0f} ({b['peak_worker_rss_mb']:.0f})",
            f"{b['peak_encoder_pss_mb']:.0f} ({b['peak_encoder_rss_mb']:.0f})",
            f"{b['peak_total_pss_mb']:.0f}",
        ),
    ]
    head = (
        "setup",
        "median step",
        "x plain",
        "data wait",
        "worker PSS (RSS) MiB",
        "encoder PSS (RSS) MiB",
        "whole run PSS MiB",
    )
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print()
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")  # Markdown, so bench/run_all.py collects it
    for r in rows:
        print(line(r))
    print(
        f"\nidle embedded Ray (driver + cluster) PSS: {results['idle_ray_pss_mb']:.0f} MiB; "
        f"{args.scale}x / 1x whole-run peak PSS: {b['peak_total_pss_mb'] / a['peak_total_pss_mb']:.2f}; "
        f"data wait incl. the epoch's first step: 1x {100 * a['data_wait_frac_all']:.0f}%, "
        f"{args.scale}x {100 * b['data_wait_frac_all']:.0f}%"
    )
    print(
        f"loss (plain) {p['first_loss']:.3f} -> {p['last_loss']:.3f}; (ray 1 worker) {r1['first_loss']:.3f} -> "
        f"{r1['last_loss']:.3f}"
    )
    (out / "bench_train.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'bench_train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
