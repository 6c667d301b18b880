"""Scoring throughput: the batched Ray Data path vs the original serial loop (one judge call at a time).

Same tiny random-weight judge, same requests: the 294 published test samples (gpt-4-turbo's answers) x 8 metrics,
with Pillow stand-ins at the image paths. Re-asks are off in both paths so each request costs one reply. Replies
are forced to --new-tokens tokens: 48 by default, about the length of the published reviews (median 38 words).
The batched path includes what the job does beyond batching: a sample's 8 metric prompts share everything but
their last lines, and the judge prefills that shared prefix once (VLM.generate's shared-prefix path).

    python bench/bench_eval.py [--serial-requests 48] [--new-tokens 16] [--replicas 2] [--batch 32]
    python bench/bench_eval.py --samples-per-file 4 --serial-requests 8 --new-tokens 4   # smoke run
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serial-requests", type=int, default=48, help="requests timed in the serial loop")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--cpus-per-replica", type=float, default=1.0, help="also the torch threads of a replica")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=8192)
    ap.add_argument("--samples-per-file", type=int, default=0, help="keep only N samples per answers file (smoke)")
    ap.add_argument(
        "--sample-dir", default=os.environ.get("MMROLE_SAMPLE_DIR", str(REPO.parent / "shared" / "mmrole-sample"))
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image

    from mmrole.eval.contract import expand_requests
    from mmrole.eval.job_config import ScoreJobConfig, load_job_config
    from mmrole.eval.judges import VLMJudge
    from mmrole.eval.pipeline import load_answers_dir
    from mmrole.models import GenerationParams, VLMConfig, build_vlm, make_tiny_vlm
    from mmrole.ray_env import init_ray
    from mmrole.ray_eval import run_score

    tmp = Path(tempfile.mkdtemp(prefix="mmrole-bench-eval-"))
    try:
        judge_dir = make_tiny_vlm(tmp / "judge", family="qwen2_vl", seed=1)
        eval_dir = tmp / "eval"
        for s in ("in", "out"):
            shutil.copytree(
                Path(args.sample_dir) / "eval" / f"{s}-test_answers" / "gpt-4-turbo",
                eval_dir / f"{s}-test_answers" / "gpt-4-turbo",
            )
        if args.samples_per_file:  # a quick smoke run of the same paths on a slice of the set
            import json

            for f in eval_dir.glob("*-test_answers/*/*_test.json"):
                recs = json.loads(f.read_text(encoding="utf-8"))[: args.samples_per_file]
                f.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
        answers, _ = load_answers_dir(eval_dir, "gpt-4-turbo")
        images = tmp / "images"
        for a in answers:
            p = images / a.image
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (160, 120), (len(a.image) * 7 % 255, 90, 160)).save(p, format="PNG")
        requests = expand_requests(answers)
        params = GenerationParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        vcfg = VLMConfig(model_path=str(judge_dir), max_length=args.max_length)

        # Serial: the original loop, one request at a time, one process (all cores available to torch).
        judge = VLMJudge(build_vlm(vcfg), params, max_retries=0, images_root=str(images))
        judge.score_batch([requests[-1]])  # warm-up (first-call allocations), not timed
        t0 = time.perf_counter()
        # A spread slice gives the rate (prompt lengths vary over the set); the batched path does all requests.
        n_serial = min(len(requests), args.serial_requests)
        for r in requests[:: max(1, len(requests) // n_serial)][:n_serial]:
            judge.score_batch([r])
        serial_rate = n_serial / (time.perf_counter() - t0)
        del judge

        # Batched: the Ray Data job path (actor pool, batched generation), every request.
        torch.set_num_threads(1)
        init_ray(log_to_driver=False)
        cfg = load_job_config(
            ScoreJobConfig,
            None,
            [
                f"eval_dir={eval_dir}",
                "model_name=gpt-4-turbo",
                f"images_root={images}",
                f"judge.model.model_path={judge_dir}",
                f"judge.model.max_length={args.max_length}",
                f"judge.generation.max_new_tokens={args.new_tokens}",
                f"judge.generation.min_new_tokens={args.new_tokens}",
                "judge.max_retries=0",
                f"pool.concurrency=[{args.replicas}]",
                f"pool.num_cpus={args.cpus_per_replica}",
                f"pool.batch_size={args.batch}",
                "bootstrap=0",
                "progress=false",
            ],
        )
        t0 = time.perf_counter()
        first: list[tuple[float, int]] = []  # (time, requests done) at the first finished batch

        def on_batch(done: int) -> None:
            if not first:
                first.append((time.perf_counter(), done))

        summary = run_score(cfg, log=lambda m: None, on_batch=on_batch)
        wall = time.perf_counter() - t0
        batched_rate = summary["requests"] / wall
        steady_rate = (summary["requests"] - first[0][1]) / max(1e-9, time.perf_counter() - first[0][0])
        rows = [
            ("requests (samples x 8 metrics)", f"{len(requests):,}"),
            ("serial loop (1 request per call)", f"{serial_rate:.1f} req/s (over {n_serial} spread over the set)"),
            (
                f"Ray Data, {args.replicas} replicas x {args.cpus_per_replica:g} CPU, batch {args.batch}",
                f"{batched_rate:.1f} req/s (incl. pool start-up, {wall:.0f} s)",
            ),
            ("  same, after the first batch (steady state)", f"{steady_rate:.1f} req/s"),
            ("batched / serial", f"{batched_rate / serial_rate:.2f}x (target >= 4x on 2 cores)"),
            ("batched / serial, steady state", f"{steady_rate / serial_rate:.2f}x"),
        ]
        print_table(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
