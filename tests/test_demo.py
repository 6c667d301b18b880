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


DEMO_ARGV = [  # few steps, one replica per pool: the whole demo in about a minute
    "--agent",
    "train.max_steps=4",
    "--reward-model",
    "train.max_steps=4",
    "--answer",
    "pool.concurrency=[1]",
    "--score",
    "pool.concurrency=[1]",
]
RL_CHAIN_MARK = (
    "<!-- test: run after a short demo (tests/test_demo.py runs every line but the first, on a 4-step demo) -->"
)


@pytest.fixture(scope="module")
def demo_clone(ray_local, tmp_path_factory):
    """A fresh-clone-like copy of the repository whose ``demo_out`` holds a finished short demo (run in this
    process on the session's Ray), as ``scripts/demo.sh`` would leave it; ``timings.json`` beside the copy."""
    from test_readme_commands import fresh_copy

    clone = fresh_copy(tmp_path_factory.mktemp("demo") / "mmrole")
    argv = ["--out", str(clone / "demo_out"), *DEMO_ARGV, "--timings", str(clone.parent / "timings.json")]
    assert _run_demo_module().main(argv) == 0
    return clone, argv


@pytest.mark.ray
@pytest.mark.slow
def test_demo_pipeline_ends_in_a_number_for_every_metric(demo_clone, ray_local, capsys):
    """The whole demo: the report has a numeric Overall and a value for all 8 metrics (the judge decodes its score
    line under the mask, and the report says so); a rerun with nothing changed skips every stage and leaves Ray
    up."""
    from mmrole.eval.metrics import METRICS

    clone, argv = demo_clone
    out, timings = clone / "demo_out", clone.parent / "timings.json"
    report = json.loads((out / "eval" / "report" / "report.json").read_text())
    (overall,) = [g for g in report["overall"] if g["model"] == "demo-agent"]
    assert isinstance(overall["overall"], float) and overall["n_failed"] == 0
    assert all(isinstance(overall["metrics"][m]["mean"], float) for m in METRICS), overall["metrics"]
    judge = report["judges"]["demo-agent"]
    assert judge["constrained_scores"] and {judge["metrics"][m]["score_pair"] for m in METRICS} == {"constrained"}
    md = (out / "eval" / "report" / "report.md").read_text()
    assert "constrained score decoding (judge.constrained_scores) for all 8 metrics" in md
    assert "| n/a |" not in md.split("### Dimensions")[0]
    first = json.loads(timings.read_text())
    assert all(first[s] is not None for s in ("train_agent", "train_reward_model", "answer", "score"))

    capsys.readouterr()
    assert _run_demo_module().main(argv) == 0 and ray_local.is_initialized()
    again = capsys.readouterr().out
    assert again.count("already done") == 7 and "Overall" in again
    assert all(v is None for k, v in json.loads(timings.read_text()).items() if k != "total")


def rl_chain_commands(readme: Path) -> list[str]:
    """The README's SFT -> preferences -> DPO -> evaluation block, without its first line (``scripts/demo.sh``,
    which installs the venv; the fixture ran the demo)."""
    from test_readme_commands import join_continuations

    lines = readme.read_text(encoding="utf-8").splitlines()
    i = lines.index(RL_CHAIN_MARK)
    assert lines[i + 1].startswith("```bash"), f"README.md:{i + 2}: the marked RL chain must be a bash block"
    k = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
    commands = join_continuations(lines[i + 2 : k])
    assert commands[0].split(" #")[0].strip() == "scripts/demo.sh", commands[0]
    return commands[1:]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readme_rl_chain_runs_verbatim_after_the_demo(demo_clone, tmp_path):
    """The README's reinforcement-learning chain, every command as written, in the copy holding the demo: the
    preference pairs are made (the summary says ok), DPO and GRPO (the demo judge's parsed ratio as reward) train
    from the demo agent, and one report holds the SFT and DPO agents with a number for every metric in both
    orders."""
    from test_readme_commands import command_env, run_block

    from mmrole.eval.metrics import METRICS

    clone, _ = demo_clone
    commands = rl_chain_commands(clone / "README.md")
    assert [c.split()[1] for c in commands[:3]] == [
        "jobs/build_preferences.py",
        "jobs/train_dpo.py",
        "jobs/train_grpo.py",
    ], commands
    script = "set -eo pipefail\n" + "\n".join(commands)
    rc, output = run_block(script, clone, command_env(clone, tmp_path), 1100)
    assert rc == 0, output[-8000:]

    out = clone / "demo_out"
    summary = json.loads((out / "preferences" / "summary.json").read_text())
    assert summary["ok"] and summary["in"] == 24 and summary["out"] >= 12, summary
    assert summary["judge"]["failed"] == 0 and summary["judge"]["parsed"] == summary["judge"]["requests"] > 0
    pairs = [json.loads(line) for line in (out / "preferences" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == summary["out"] and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    run = out / "runs" / "demo-dpo"
    assert (run / "final_model" / "config.json").is_file() and (run / "reference_logps.jsonl").is_file()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert steps and all("reward_margin" in s for s in steps if "loss" in s), steps[:2]

    # GRPO from the demo agent with the demo reward model as the judge inside Ray Train: its replies parse
    grpo = out / "runs" / "demo-grpo"
    summary = json.loads((grpo / "summary.json").read_text())
    assert summary["ok"] and summary["final_step"] == 3, summary
    counts = summary["counts"]
    assert counts["rollouts"] == 48 and counts["rollouts_failed"] <= 0.2 * 48, counts
    assert not [r for r in counts["failure_reasons"] if "unparsable" in r], counts
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    judged = [r["reward_judge"] for r in rows if "reward_judge" in r]
    assert len(judged) == 3 and all(0 < j < 10 for j in judged), judged
    assert (grpo / "final_model" / "config.json").is_file()

    report = json.loads((out / "eval" / "report" / "report.json").read_text())
    overall = {g["model"]: g for g in report["overall"]}
    assert set(overall) == {"demo-agent", "demo-dpo"}
    for g in overall.values():
        assert isinstance(g["overall"], float) and g["n_failed"] == 0
        assert all(isinstance(g["metrics"][m]["mean"], float) for m in METRICS)
    md = (out / "eval" / "report" / "report.md").read_text()
    assert "position consistency (normal vs swapped order)" in md and "| demo-dpo | 168 |" in md
