"""The main command's stage bookkeeping (jobs/run_demo.py), on its first three stages (seconds): a rerun skips
finished stages, a stage whose output is gone runs again, and so does every stage after it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _demo(out: Path, *extra: str) -> str:
    r = subprocess.run(
        [sys.executable, "jobs/run_demo.py", "--out", str(out), "--until", "prepare", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_demo_reruns_skip_done_stages_and_redo_missing_outputs(tmp_path):
    out = tmp_path / "demo"
    first = _demo(out)
    assert "[1/7] data done" in first and "[3/7] prepare done" in first
    manifest = out / "prepared" / "manifest.json"
    assert manifest.is_file()

    again = _demo(out)
    assert "[1/7] data: already done" in again and "[3/7] prepare: already done" in again

    shutil.rmtree(out / "MMRole_dataset")  # an output gone: that stage and every later one run again
    redo = _demo(out)
    assert "[1/7] data done" in redo and "[2/7] validate done" in redo and "[3/7] prepare done" in redo
    assert manifest.is_file()

    fresh = _demo(out, "--fresh")
    assert "already done" not in fresh and "[3/7] prepare done" in fresh
