"""Rendering + Parquet writing rate of ``mmrole data prepare`` on a synthetic ~85K-sample scale-up.

The real MMRole slice (8 roles' dialogues, 8,758 samples) is replicated N times with fresh dialogue ids into a
temporary dataset root; ``prepare`` then runs in this process (one core). Prints samples/s and peak memory,
next to the rate of rendering alone, so the Parquet cost is visible as a ratio.

    python bench/bench_data.py [--copies 10] [--sample-dir ../shared/mmrole-sample]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _table import print_table  # noqa: E402

from mmrole.data.prepare import PrepareConfig, prepare  # noqa: E402
from mmrole.data.reader import load_dataset  # noqa: E402
from mmrole.data.render import RenderStats, expand_dialogue  # noqa: E402
from mmrole.data.templates import load_roleplay_template  # noqa: E402


def scale_up(src: Path, dst: Path, copies: int) -> None:
    shutil.copytree(src / "profiles", dst / "profiles")
    (dst / "images").mkdir(parents=True)
    shutil.copy(src / "images" / "annotations.json", dst / "images" / "annotations.json")
    for f in (src / "dialogues").rglob("*.json"):
        recs = json.loads(f.read_text(encoding="utf-8"))
        out = []
        for c in range(copies):
            for r in recs:
                r2 = dict(r)
                stem, idx = r["id"].rsplit("_", 1)
                r2["id"] = f"{stem}_{c * 10000 + int(idx)}"
                out.append(r2)
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument(
        "--sample-dir", default=os.environ.get("MMROLE_SAMPLE_DIR", str(REPO.parent / "shared" / "mmrole-sample"))
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mmrole-bench-"))
    try:
        root = tmp / "MMRole_dataset"
        scale_up(Path(args.sample_dir), root, args.copies)
        rss0 = peak_rss_mb()
        ds = load_dataset(root)
        t = load_roleplay_template()
        st = RenderStats()
        t0 = time.perf_counter()
        n_render = sum(1 for d in ds.iter_dialogues() for _ in expand_dialogue(d, ds.characters, t, st))
        t_render = time.perf_counter() - t0
        rss_render = peak_rss_mb()
        t0 = time.perf_counter()
        m = prepare(root, tmp / "prepared", PrepareConfig(require_images=False))
        t_prep = time.perf_counter() - t0
        n = m["splits"]["train"]["rows"]
        size = sum((tmp / "prepared" / f).stat().st_size for f in m["splits"]["train"]["files"])
        rows = [
            ("samples", f"{n:,}"),
            ("render only (read JSON + render)", f"{n_render / t_render:,.0f} samples/s"),
            ("prepare (read + render + Parquet zstd)", f"{n / t_prep:,.0f} samples/s"),
            ("prepare / render-only time ratio", f"{t_prep / t_render:.2f}x"),
            ("target", ">= 5,000 samples/s on one core"),
            ("Parquet size", f"{size / 2**20:.1f} MiB in {len(m['splits']['train']['files'])} shards"),
            (
                "peak RSS before / after render / after prepare",
                f"{rss0:.0f} / {rss_render:.0f} / {peak_rss_mb():.0f} MiB",
            ),
        ]
        print_table(rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
