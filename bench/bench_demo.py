"""Seconds per stage of the demo pipeline (jobs/run_demo.py, as scripts/demo.sh runs it, install apart): a cold
run into a fresh output folder, then a warm rerun with nothing changed, side by side.

The DeepSpeed op cache is an empty temporary folder, so a DeepSpeed op that would be JIT-built on first use is
built (and counted) here; with the op prebuilt at install time (scripts/bootstrap.sh) the count is 0. The load
average is printed: on a shared machine the wall times scale with it.

    python bench/bench_demo.py [--keep OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGES = ("data", "validate", "prepare", "ray_start", "train_agent", "train_reward_model", "answer", "score")


def run_demo(out: Path, timings: Path, env: dict, fresh: bool) -> float:
    cmd = [sys.executable, str(REPO / "jobs" / "run_demo.py"), "--out", str(out), "--timings", str(timings)]
    t0 = time.time()
    proc = subprocess.run(cmd + (["--fresh"] if fresh else []), cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run_demo failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - t0


def _s(v) -> str:
    return "skipped" if v is None else f"{v:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", default=None, help="output folder to keep (default: a temporary one)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    out = Path(args.keep).resolve() if args.keep else tmp / "demo_out"
    ext = tmp / "torch_extensions"
    ext.mkdir()
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(ext),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    load0 = os.getloadavg()[0]
    cold_wall = run_demo(out, tmp / "cold.json", env, fresh=True)
    warm_wall = run_demo(out, tmp / "warm.json", env, fresh=False)
    load1 = os.getloadavg()[0]
    cold = json.loads((tmp / "cold.json").read_text())
    warm = json.loads((tmp / "warm.json").read_text())
    jit_built = sorted(p.name for p in ext.iterdir())
    rows = [("figure", "cold | warm rerun")]
    rows += [(f"{stage} (s)", f"{_s(cold.get(stage))} | {_s(warm.get(stage))}") for stage in STAGES]
    rows += [
        ("pipeline total (s, run_demo)", f"{_s(cold['total'])} | {_s(warm['total'])}"),
        ("process wall incl. interpreter start (s)", f"{cold_wall:.1f} s | {warm_wall:.1f} s"),
        ("warm / cold", f"{warm['total'] / max(cold['total'], 1e-9):.2f}"),
        (
            "DeepSpeed ops JIT-built on first use",
            str(len(jit_built)) + (f" ({', '.join(jit_built)})" if jit_built else ""),
        ),
        ("load average (1 min), start | end", f"{load0:.1f} | {load1:.1f} ({os.cpu_count()} CPUs)"),
    ]
    report = out / "eval" / "report" / "report.json"
    if report.is_file():
        overall = next(g for g in json.loads(report.read_text())["overall"] if g["model"] == "demo-agent")
        rows.append(
            ("demo-agent Overall (report)", "n/a" if overall["overall"] is None else f"{overall['overall']:.3f}")
        )
    # Three columns (figure | cold | warm rerun); bench/run_all.py reads them as one row each.
    body = rows[1:]
    w = max(len(a) for a, _ in body)
    print(f"| {'figure'.ljust(w)} | cold | warm rerun |\n|{'-' * (w + 2)}|------|------------|")
    for a, b in body:
        cells = b.split(" | ") if " | " in b else [b, ""]
        print(f"| {a.ljust(w)} | {cells[0]} | {cells[1]} |")
    print(f"\noutputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
