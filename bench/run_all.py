"""Run every benchmark in bench/ and print one table (benchmark | figure | value).

    python bench/run_all.py [--quick] [--skip bench_train_gpu]

Each benchmark is a script that prints a Markdown table; its rows are collected here. GPU-only benchmarks are
skipped without CUDA. The full output of each script is kept in bench/results/<name>.log.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# Quick settings, so the whole set fits a few minutes on a 2-core machine.
QUICK_ARGS = {"bench_data.py": ["--copies", "3"], "bench_serve.py": ["--quick"]}
GPU_ONLY = {"bench_train_gpu.py"}


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue  # separator
        rows.append(cells)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    collected: list[tuple[str, str, str]] = []
    for script in sorted(BENCH.glob("bench_*.py")):
        name = script.name
        if script.stem in args.skip or name in args.skip:
            continue
        if name in GPU_ONLY and not has_cuda:
            collected.append((script.stem, "skipped", "needs a CUDA GPU"))
            continue
        cmd = [sys.executable, str(script)] + (QUICK_ARGS.get(name, []) if args.quick else [])
        print(f"running {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out_dir / f"{script.stem}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0:
            collected.append((script.stem, "FAILED", f"exit {proc.returncode}, see bench/results/{script.stem}.log"))
            continue
        rows = table_rows(proc.stdout)
        header = rows[0] if rows else []
        for r in rows[1:]:
            value = (
                "; ".join(f"{h}={v}" for h, v in zip(header[1:], r[1:])) if len(r) > 2 else (r[1] if len(r) > 1 else "")
            )
            collected.append((script.stem, r[0], value))
        collected.append((script.stem, "wall time", f"{time.time() - t0:.0f} s"))
    w1 = max(len(a) for a, _, _ in collected)
    w2 = max(len(b) for _, b, _ in collected)
    print(f"| {'benchmark'.ljust(w1)} | {'figure'.ljust(w2)} | value |")
    print(f"|{'-' * (w1 + 2)}|{'-' * (w2 + 2)}|-------|")
    for a, b, c in collected:
        print(f"| {a.ljust(w1)} | {b.ljust(w2)} | {c} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
