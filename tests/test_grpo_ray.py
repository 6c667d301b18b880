"""Online GRPO on real Ray Train + DeepSpeed (CPU, gloo, 2 workers) with a tiny random-weight agent.

Run A learns a learnable rule reward (the share of a reply made of a few style words): the mean reward on held-out
prompts (fixed seeds, so before/after pair prompt by prompt) rises significantly (paired bootstrap) while the KL to
the reference stays bounded. Run B is the same config with a worker SIGKILLed after step 5: Ray restarts the group,
it resumes from the checkpoint of step 4 and gives the same per-step metrics as run A. Run C scores with a tiny
random judge whose replies never parse: every reward fails, the step is skipped and the run stops with ok false.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
STYLE = "[sky,sea,red,blue,gold,tree,castle,night]"


def _overrides(tmp: Path, model: Path, prep: Path, run_name: str) -> list[str]:
    return [
        f"run_name={run_name}",
        f"output_dir={tmp / 'runs'}",
        f"model.model_path={model}",
        f"data.prepared={prep}",
        "tiny_model=null",
        "data.max_rows=24",
        "data.eval_rows=8",
        "train.epochs=4",  # 16 prompts / 8 per step = 2 steps an epoch: 8 steps
        "train.lr=1e-2",
        "checkpoint.every_steps=2",
        "grpo.group_size=4",
        "grpo.kl_coef=0.05",
        "grpo.reward.judge=0",
        "grpo.reward.rules.language=0",
        "grpo.reward.rules.generic=0",
        "grpo.reward.rules.style=1",
        f"grpo.reward.rules.style_tokens={STYLE}",
        "report_to=[]",
    ]


@pytest.fixture(scope="module")
def grpo_runs(ray_local, tmp_path_factory):
    from mmrole.models import make_tiny_vlm
    from mmrole.ray_grpo_recipe import grpo_verdict, train_loop_per_worker
    from mmrole.ray_train import run_training
    from mmrole.rl.config import load_grpo_config
    from mmrole.train.synthetic import write_prepared

    tmp = tmp_path_factory.mktemp("grpo")
    prep = write_prepared(tmp / "prep", 24, seed=1, n_images=8)
    model = make_tiny_vlm(tmp / "tiny", "qwen2_5_vl", seed=0)
    cfg_path = REPO / "configs" / "grpo_smoke_cpu.yaml"

    def run(cfg):
        return run_training(
            cfg, quiet=True, train_loop=train_loop_per_worker, verdict=grpo_verdict(cfg.grpo.max_failed_share)
        )

    a = load_grpo_config(cfg_path, _overrides(tmp, model, prep, "learn"))
    b = load_grpo_config(
        cfg_path,
        _overrides(tmp, model, prep, "killed")
        + ["debug.kill_at_steps=[5]", "debug.kill_rank=1", "scaling.max_failures=1"],
    )
    judge = make_tiny_vlm(tmp / "judge", "qwen2_vl", seed=1)
    c = load_grpo_config(
        cfg_path,
        _overrides(tmp, model, prep, "judged")
        + [
            "grpo.reward.judge=1",
            "grpo.reward.metrics=[Fluency]",
            "grpo.judge.kind=local",
            f"grpo.judge.model.model_path={judge}",
            "grpo.judge.model.device=cpu",
            "grpo.judge.generation.max_new_tokens=6",
            "grpo.judge.max_retries=0",
            "grpo.judge_num_cpus=0.25",
            "data.eval_rows=0",
            "scaling.num_workers=1",
            "train.micro_batch_size=4",
        ],
    )
    return {"a": (a, run(a)), "b": (b, run(b)), "c": (c, run(c))}


def _last_steps(run_dir) -> dict[int, dict]:
    from mmrole.train.metrics import read_metrics, step_records

    out = {}
    for r in step_records(read_metrics(run_dir)):
        out[r["step"]] = r  # the last attempt of a redone step wins
    return out


def _evals(run_dir) -> list[dict]:
    from mmrole.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if "eval_reward" in r]


@pytest.mark.timeout(900)
def test_grpo_learns_a_rule_reward_with_bounded_kl(grpo_runs):
    from mmrole.rl.stats import paired_bootstrap

    cfg, s = grpo_runs["a"]
    assert s.ok and s.final_step == 8, s
    steps = _last_steps(cfg.run_dir)
    assert sorted(steps) == list(range(1, 9))
    assert all(r["rollouts"] == 32 and r["rollouts_failed"] == 0 and not r["skipped"] for r in steps.values())
    assert s.counts["rollouts"] == 8 * 32 and s.counts["rollouts_failed"] == 0
    evals = _evals(cfg.run_dir)
    assert [e["step"] for e in evals] == [0, 8]
    before, after = evals[0]["eval_rewards"], evals[-1]["eval_rewards"]
    assert len(before) == len(after) == 8
    test = paired_bootstrap(before, after, seed=0)
    assert test["n"] == 8 and test["ci"][0] > 0 and test["p_le_0"] < 0.01, test
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.05, (
        evals[0]["eval_reward"],
        evals[-1]["eval_reward"],
    )
    # The training reward rises too, and the KL to the reference stays bounded (k3 per token).
    first, last = steps[1]["reward_mean"], steps[8]["reward_mean"]
    assert last > first, (first, last)
    kls = [steps[i]["kl"] for i in range(1, 9)]
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update starts at the reference
    assert all(0 <= k < 1.0 for k in kls), kls
    for k in ("rollout_s", "reward_s", "update_s"):
        assert all(r[k] >= 0 for r in steps.values())


@pytest.mark.timeout(900)
def test_grpo_killed_and_resumed_matches_the_uninterrupted_run(grpo_runs):
    from mmrole.train.metrics import read_metrics

    (ca, _), (cb, sb) = grpo_runs["a"], grpo_runs["b"]
    assert sb.ok and sb.final_step == 8, sb
    recs = read_metrics(cb.run_dir)
    resumes = [r for r in recs if r.get("event") == "resume"]
    assert [(r["from_step"], r["mode"]) for r in resumes] == [(4, "exact")]
    golden, resumed = _last_steps(ca.run_dir), _last_steps(cb.run_dir)
    assert sorted(resumed) == sorted(golden)
    for step in golden:
        for k in ("loss", "reward_mean", "kl", "lr", "reply_tokens_mean"):
            assert resumed[step][k] == pytest.approx(golden[step][k], rel=1e-5, abs=1e-9), (step, k)
    assert _evals(cb.run_dir)[-1]["eval_rewards"] == pytest.approx(_evals(ca.run_dir)[-1]["eval_rewards"])
    # Run totals carried over the resume (trainer state), not restarted.
    assert resumed[8]["run_rollouts"] == golden[8]["run_rollouts"] == 8 * 32


@pytest.mark.timeout(900)
def test_grpo_judge_failures_stop_the_run(grpo_runs):
    import json

    cfg, s = grpo_runs["c"]
    assert not s.ok and "max_failed_share" in s.error, s
    steps = _last_steps(cfg.run_dir)
    assert sorted(steps) == [1]  # stopped after the first step
    st = steps[1]
    assert st["skipped"] and st["rollouts_failed"] == st["rollouts"] == 32
    assert any("Fluency" in k for k in st["failure_reasons"]), st["failure_reasons"]
    assert s.counts["rollouts_failed"] == 32 and s.counts["skipped_steps"] == 1
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["ok"] is False and summary["counts"]["failure_reasons"]
