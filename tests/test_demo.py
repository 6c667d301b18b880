"""The main command (jobs/run_demo.py): its stage bookkeeping on the first three stages (seconds: a rerun skips
finished stages, a stage whose output is gone runs again, and so does every stage after it), and the whole
pipeline ending in a number for every metric."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def _run_demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_test_run_demo", REPO / "jobs" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
@pytest.mark.slow
def test_demo_pipeline_ends_in_a_number_for_every_metric(ray_local, tmp_path, capsys):
    """The whole demo in this process on the session's Ray (few steps, one replica per pool): the report has a
    numeric Overall and a value for all 8 metrics (the judge decodes its score line under the mask, and the report
    says so); a rerun with nothing changed skips every stage and leaves Ray up."""
    from mmrole.eval.metrics import METRICS

    demo = _run_demo_module()
    out = tmp_path / "demo"
    argv = [
        "--out",
        str(out),
        "--agent",
        "train.max_steps=4",
        "--reward-model",
        "train.max_steps=4",
        "--answer",
        "pool.concurrency=[1]",
        "--score",
        "pool.concurrency=[1]",
        "--timings",
        str(tmp_path / "timings.json"),
    ]
    assert demo.main(argv) == 0
    report = json.loads((out / "eval" / "report" / "report.json").read_text())
    (overall,) = [g for g in report["overall"] if g["model"] == "demo-agent"]
    assert isinstance(overall["overall"], float) and overall["n_failed"] == 0
    assert all(isinstance(overall["metrics"][m]["mean"], float) for m in METRICS), overall["metrics"]
    judge = report["judges"]["demo-agent"]
    assert judge["constrained_scores"] and {judge["metrics"][m]["score_pair"] for m in METRICS} == {"constrained"}
    md = (out / "eval" / "report" / "report.md").read_text()
    assert "constrained score decoding (judge.constrained_scores) for all 8 metrics" in md
    assert "| n/a |" not in md.split("### Dimensions")[0]
    first = json.loads((tmp_path / "timings.json").read_text())
    assert all(first[s] is not None for s in ("train_agent", "train_reward_model", "answer", "score"))

    capsys.readouterr()
    assert demo.main(argv) == 0 and ray_local.is_initialized()
    again = capsys.readouterr().out
    assert again.count("already done") == 7 and "Overall" in again
    assert all(v is None for k, v in json.loads((tmp_path / "timings.json").read_text()).items() if k != "total")
