"""DPO on real Ray Train + DeepSpeed (CPU, gloo) with a tiny Qwen2.5-VL, on pairs whose preference is learnable
(chosen replies use one word set, rejected ones another, on every prompt).

Run 1 is SIGKILLed after step 3 and recovers from the checkpoint of step 2 (max_failures=1); run 2 is the same
config never interrupted (and encoded in the worker's thread instead of Ray Data actors). Resume is exact (the same per-step DPO metrics and rows); the run learns (held-out
reward accuracy and margin, from 0 at the start, rise well past chance).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
GOOD = "sunny bright golden warm happy".split()
BAD = "rainy dark grey cold gloomy".split()
N_TRAIN, N_EVAL = 24, 12
STEP_KEYS = (
    "loss",
    "reward_margin",
    "reward_accuracy",
    "chosen_reward",
    "rejected_reward",
    "logp_chosen",
    "logp_rejected",
    "lr",
    "samples",
)


def write_learnable_pairs(root: Path) -> Path:
    """A preference folder (as jobs/build_preferences.py writes it) of synthetic prompts: chosen = words of GOOD,
    rejected = words of BAD, in random orders and lengths."""
    from mmrole.data.records import Sample
    from mmrole.rl.preferences import RowOutcome, write_preferences
    from mmrole.train.synthetic import write_prepared

    src = write_prepared(root / "src", N_TRAIN + N_EVAL, seed=3, n_images=6)
    rng = random.Random(0)
    rows = []
    for r in json.loads((src / "manifest.json").read_text())["splits"]["train"]["files"]:
        import pyarrow.parquet as pq

        for rec in pq.read_table(src / r).to_pylist():
            s = Sample.from_row(rec)
            say = lambda words: " ".join(rng.choice(words) for _ in range(rng.randint(3, 6))) + "."  # noqa: E731
            pair = dict(
                chosen=say(GOOD),
                rejected=say(BAD),
                chosen_score=1.0,
                rejected_score=0.5,
                chosen_k=0,
                rejected_k=1,
                scored=2,
            )
            rows.append(RowOutcome(s, [], pair=pair))
    summary = {"in": len(rows), "out": len(rows), "rejected": 0, "rejected_by_reason": {}}
    out = root / "prefs"
    write_preferences(out, str(src / "images"), rows, summary, {})
    return out


def _overrides(tmp: Path, model: str, prefs: Path, run_name: str) -> list[str]:
    return [
        f"run_name={run_name}",
        f"output_dir={tmp / 'runs'}",
        f"model.model_path={model}",
        "model.max_length=512",
        f"data.prepared={prefs}",
        f"data.eval_rows={N_EVAL}",
        "data.prefetch_batches=2",
        "debug.record_rows=true",
        "train.epochs=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",  # 1 worker x 2 pairs x accumulation 2
        "train.lr=2e-3",
        "train.seed=0",
        "scaling.num_workers=1",
        "scaling.max_failures=1",
        "checkpoint.every_steps=2",
        "checkpoint.num_to_keep=2",
        "dpo.beta=0.5",
        "debug.kill_at_steps=[3]",
        "debug.kill_rank=0",
    ]


@pytest.fixture(scope="module")
def dpo_runs(ray_local, tiny_models, tmp_path_factory):
    from mmrole.ray_dpo_recipe import train_loop_per_worker
    from mmrole.ray_train import run_training
    from mmrole.rl.dpo_config import load_dpo_config

    tmp = tmp_path_factory.mktemp("dpo")
    prefs = write_learnable_pairs(tmp)
    smoke = REPO / "configs" / "dpo_smoke_cpu.yaml"
    cfg = load_dpo_config(smoke, _overrides(tmp, tiny_models["agent"], prefs, "killed"))
    killed = run_training(cfg, quiet=True, train_loop=train_loop_per_worker)
    # Never interrupted, and encoded in the worker's thread instead of Ray Data actors: the same pairs either way.
    golden_cfg = load_dpo_config(
        smoke,
        _overrides(tmp, tiny_models["agent"], prefs, "golden") + ["debug.kill_at_steps=[]", "data.encode_actors=0"],
    )
    golden = run_training(golden_cfg, quiet=True, train_loop=train_loop_per_worker)
    return {"cfg": cfg, "killed": killed, "golden_cfg": golden_cfg, "golden": golden}


def _last_per_step(run_dir: Path) -> tuple[dict, list[dict]]:
    from mmrole.train.metrics import read_metrics

    recs = read_metrics(run_dir)
    steps = {}
    for r in recs:
        if "loss" in r and "event" not in r:
            steps[r["step"]] = r  # the last attempt of a redone step wins
    return steps, recs


@pytest.mark.timeout(900)
def test_dpo_killed_and_resumed_matches_the_uninterrupted_run(dpo_runs):
    killed, golden = dpo_runs["killed"], dpo_runs["golden"]
    assert killed.ok and golden.ok, (killed, golden)
    total = N_TRAIN // 4
    assert killed.final_step == golden.final_step == total
    k_steps, k_recs = _last_per_step(dpo_runs["cfg"].run_dir)
    g_steps, _ = _last_per_step(dpo_runs["golden_cfg"].run_dir)
    resumes = [r for r in k_recs if r.get("event") == "resume"]
    assert [(r["from_step"], r["mode"]) for r in resumes] == [(2, "exact")]
    assert sorted(k_steps) == sorted(g_steps) == list(range(1, total + 1))
    for step in g_steps:
        for key in STEP_KEYS:
            assert k_steps[step][key] == pytest.approx(g_steps[step][key], rel=1e-5, abs=1e-7), (step, key)
    rows = lambda d: [json.loads(x) for x in (d / "row_log" / "rank0.jsonl").read_text().splitlines()]  # noqa: E731
    k_rows = {r["step"]: r["ids"] for r in rows(dpo_runs["cfg"].run_dir)}
    g_rows = {r["step"]: r["ids"] for r in rows(dpo_runs["golden_cfg"].run_dir)}
    assert k_rows == g_rows
    # The reference log-probs were computed once, before step 1, and reused by the restarted attempt.
    ref = [json.loads(x) for x in (dpo_runs["cfg"].run_dir / "reference_logps.jsonl").read_text().splitlines()]
    assert len(ref) == N_TRAIN + N_EVAL and all(r["ref"][1] > 0 and r["ref"][3] > 0 for r in ref)
    assert killed.counts["in"] == N_TRAIN + N_EVAL and killed.counts["rejected"] == 0


@pytest.mark.timeout(900)
def test_dpo_learns_the_preference_on_held_out_pairs(dpo_runs):
    steps, recs = _last_per_step(dpo_runs["golden_cfg"].run_dir)
    first, last = steps[1], steps[max(steps)]
    # Step 1: the policy is the reference, so every implicit reward is (numerically) 0 and the loss is log 2.
    assert abs(first["reward_margin"]) < 1e-4 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert last["reward_margin"] > 0.5 and last["reward_accuracy"] == 1.0, last
    evals = [r for r in recs if "eval_reward_accuracy" in r]
    assert evals, "no validation record"
    ev = evals[-1]
    assert ev["eval_pairs"] == N_EVAL
    # 12 held-out pairs: >= 11 right has p < 0.004 under chance (0.5 each).
    assert ev["eval_reward_accuracy"] >= 11 / 12 and ev["eval_reward_margin"] > 0.5, ev
    assert ev["eval_loss"] < math.log(2) - 0.2, ev
    assert dpo_runs["golden"].eval_loss == pytest.approx(ev["eval_loss"])
