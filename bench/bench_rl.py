#!/usr/bin/env python
"""GRPO step anatomy on a tiny random-weight Qwen2.5-VL (CPU is fine): per optimizer step, the time spent in
rollouts (batched generation of G replies per prompt), rewards (rule rewards, and the judge) and the update
(policy + reference forward, backward, optimizer step), as shares of the step. Prints a table and writes JSON.

Two runs on the same synthetic prompts, 2 Ray Train workers, ZeRO-2:

* ``rules``: rule rewards only (no judge calls);
* ``judge``: the MMRole-Eval ratio from an OpenAI-compatible judge endpoint (a local stand-in server in this
  process that answers ``[Scores]: (A, 8)`` after ``--judge-latency`` seconds, as a remote judge would), plus the
  rule rewards. Judge calls go out concurrently (``openai.max_concurrency``).

    python bench/bench_rl.py [--steps 6] [--group-size 4] [--max-new-tokens 16] [--judge-latency 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _table import print_table  # noqa: E402

from mmrole.ray_env import default_torch_extensions_dir  # noqa: E402

os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
PARTS = ("rollout_s", "reward_s", "update_s")


def judge_server(latency: float) -> tuple[ThreadingHTTPServer, str]:
    """A stand-in OpenAI-compatible judge: score A from the length of the request, B = 8, after ``latency``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(latency)
            a = 3 + len(body) % 6
            out = {
                "id": "bench",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"Fine. [Scores]: ({a}, 8)"},
                        "finish_reason": "stop",
                    }
                ],
            }
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def run(name: str, tmp: Path, model: Path, prep: Path, args, extra: list[str]) -> dict:
    from mmrole.ray_grpo_recipe import grpo_verdict, train_loop_per_worker
    from mmrole.ray_train import run_training
    from mmrole.rl.config import load_grpo_config
    from mmrole.train.metrics import read_metrics, step_records

    overrides = [
        f"run_name=bench-{name}",
        f"output_dir={tmp / 'runs'}",
        f"model.model_path={model}",
        f"data.prepared={prep}",
        "tiny_model=null",
        f"data.max_rows={8 * args.steps}",
        "data.eval_rows=0",
        f"train.max_steps={args.steps}",
        f"grpo.group_size={args.group_size}",
        f"grpo.max_new_tokens={args.max_new_tokens}",
        "grpo.reward.rules.style_tokens=[sky,sea,red,blue]",
        f"checkpoint.every_steps={args.steps}",
        "report_to=[]",
    ] + extra
    cfg = load_grpo_config(REPO / "configs" / "grpo_smoke_cpu.yaml", overrides)
    t0 = time.time()
    s = run_training(cfg, quiet=True, train_loop=train_loop_per_worker, verdict=grpo_verdict(cfg.grpo.max_failed_share))
    wall = time.time() - t0
    if not s.ok:
        raise SystemExit(f"{name}: run failed: {s.error}")
    steps = step_records(read_metrics(cfg.run_dir))[1:]  # step 1 carries first-call warm-up
    step_s = statistics.median(r["step_time_s"] for r in steps)
    out = {"wall_s": wall, "steps": len(steps) + 1, "step_s": step_s}
    for p in PARTS:
        out[p] = statistics.median(r[p] for r in steps)
        out[p.replace("_s", "_share")] = statistics.median(r[p] / r["step_time_s"] for r in steps)
    out["other_share"] = max(0.0, 1.0 - sum(out[p.replace("_s", "_share")] for p in PARTS))
    out["rollouts_per_step"] = steps[-1]["rollouts"]
    out["reward_mean_last"] = steps[-1]["reward_mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--judge-latency", type=float, default=0.05, help="seconds per judge request (stand-in)")
    ap.add_argument("--out", default=None, help="folder for the runs and bench_rl.json (default: a temp dir)")
    args = ap.parse_args()

    from mmrole.models import make_tiny_vlm
    from mmrole.ray_env import init_ray
    from mmrole.train.synthetic import write_prepared

    tmp = Path(args.out or tempfile.mkdtemp(prefix="bench_rl_"))
    tmp.mkdir(parents=True, exist_ok=True)
    prep = write_prepared(tmp / "prep", 8 * args.steps, seed=1, n_images=8)
    model = make_tiny_vlm(tmp / "tiny", "qwen2_5_vl", seed=0)
    init_ray(num_cpus=4, log_to_driver=False)
    server, url = judge_server(args.judge_latency)
    try:
        rules = run("rules", tmp, model, prep, args, ["grpo.reward.judge=0"])
        judge = run(
            "judge",
            tmp,
            model,
            prep,
            args,
            [
                "grpo.reward.judge=1",
                "grpo.reward.metrics=[Fluency,Personality Consistency]",
                "grpo.judge.kind=openai",
                "grpo.judge.openai.model=stand-in",
                f"grpo.judge.openai.base_url={url}",
                "grpo.judge.openai.api_key_env=null",
                "grpo.judge.openai.require_api_key=false",
                "grpo.judge.openai.max_concurrency=16",
                "grpo.judge_batch_size=64",
            ],
        )
    finally:
        server.shutdown()
    load = os.getloadavg()
    rows = [
        ("load average (1 min) at the end", f"{load[0]:.1f} on {os.cpu_count()} cores"),
        (
            "rollouts per step (2 workers)",
            f"{rules['rollouts_per_step']} (G={args.group_size}, {args.max_new_tokens} new tokens)",
        ),
    ]
    for name, r in (("rules", rules), ("judge", judge)):
        rows += [
            (f"{name}: step time (median, steps 2..)", f"{r['step_s']:.3f} s"),
            (
                f"{name}: rollout / reward / update share",
                f"{r['rollout_share']:.0%} / {r['reward_share']:.0%} / {r['update_share']:.0%} "
                f"(other {r['other_share']:.0%})",
            ),
            (
                f"{name}: rollout / reward / update seconds",
                f"{r['rollout_s']:.3f} / {r['reward_s']:.3f} / {r['update_s']:.3f}",
            ),
        ]
    rows.append(("judge run / rules run step time", f"{judge['step_s'] / rules['step_s']:.2f}x"))
    print_table(rows)
    (tmp / "bench_rl.json").write_text(json.dumps({"rules": rules, "judge": judge, "args": vars(args)}, indent=2))
    print(f"json: {tmp / 'bench_rl.json'}")


if __name__ == "__main__":
    main()
