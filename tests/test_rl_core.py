"""Pure GRPO arithmetic and rewards against hand computations (no Ray, no model)."""

from __future__ import annotations

import math

import pytest
import torch


def test_group_advantages_by_hand():
    from mmrole.rl.grpo import group_advantages

    # Group 1: rewards 1, 2, 3 -> mean 2, sample std 1. Group 2: one failure, 0 and 4 -> mean 2, std 2*sqrt(2).
    adv, usable = group_advantages([1.0, 2.0, 3.0, 0.0, None, 4.0], 3, eps=0.0)
    assert adv[:3] == pytest.approx([-1.0, 0.0, 1.0])
    s = math.sqrt(8.0)
    assert adv[3:] == pytest.approx([-2 / s, 0.0, 2 / s])
    assert usable == [True, True, True, True, False, True]
    # Fewer than 2 successes: no signal for the whole group; mean-centred only when asked.
    adv, usable = group_advantages([None, 5.0, 1.0, 3.0], 2, normalize_std=False)
    assert adv == [0.0, 0.0, -1.0, 1.0] and usable == [False, False, True, True]
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages([1.0, 2.0, 3.0], 2)


def test_grpo_token_loss_by_hand():
    from mmrole.rl.grpo import grpo_token_loss

    logp = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.8), 0.0]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.25)], [math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.4), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    out = grpo_token_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    # Row 0 token 0: ratio 1.25 > 1.2, A=1 -> pg = -1.2 (clipped). Token 1: ratio 1, pg = -1.
    # Row 1 token 0: ratio 1.6, A=-2 -> min(-3.2, -2.4) = -3.2 -> pg = 3.2 (not clipped). Token 1 masked.
    pg = -1.2 - 1.0 + 3.2
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    kl = k3(0.0) + k3(math.log(2.0)) + k3(math.log(0.5))
    assert out.pg == pytest.approx(pg) and out.kl == pytest.approx(kl)
    assert float(out.loss.detach()) == pytest.approx(pg + 0.1 * kl)
    assert out.tokens == 3 and out.clipped == 1
    # On-policy (old = logp detached): the gradient of the pg term is -A * d logp.
    lp = logp.detach().clone().requires_grad_(True)
    grpo_token_loss(lp, lp.detach(), lp.detach(), adv, mask, kl_coef=0.0).loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -1.0], [2.0, 0.0]]))
    with pytest.raises(ValueError, match="shapes"):
        grpo_token_loss(logp, old, ref, adv[:1], mask)


def test_rule_rewards_and_judge_ratio():
    from mmrole.eval.contract import JudgeResult
    from mmrole.rl.rewards import RewardSettings, RuleSettings, judge_requests, rollout_reward, style_share

    meta = {"role": "Ada", "system": "You are Ada, a painter.", "user_text": "Q?", "target": "Gold.", "image": "a.png"}
    rules = RuleSettings(language=1.0, length=0.5, length_band=[10, 20], generic=2.0, style=1.0, style_tokens=["sky"])
    s = RewardSettings(judge=0.0, rules=rules)
    r = rollout_reward("The sky is blue", meta, s)
    # English reply for an English character (1), 15 chars in band (1), not generic (0), "sky" = 3 of 15 chars.
    assert r.components == pytest.approx({"language": 1.0, "length": 1.0, "generic": 0.0, "style": 0.2})
    assert r.value == pytest.approx(1.0 + 0.5 + 0.2)
    r = rollout_reward("天空 天空", meta, s)  # Chinese for an English character, 5 chars (0.5), 1 distinct word
    assert r.components["language"] == 0.0 and r.components["length"] == 0.5 and r.components["generic"] == -1.0
    assert style_share("SKYsky", ["sky"]) == 1.0
    assert rollout_reward(None, meta, s, rollout_error="boom").error == "rollout: boom"

    # Judge: the MMRole-Eval ratio A/B, mean over the chosen metrics; one unparsable metric fails the reward.
    js = RewardSettings(judge=1.0, metrics=["Fluency", "Coherency"])
    reqs = judge_requests("x#g0", "A reply", meta, js.metrics)
    assert [q.metric for q in reqs] == ["Fluency", "Coherency"] and reqs[0].reference == "Gold."
    good = [
        JudgeResult("x#g0", "Fluency", True, 6.0, 8.0),
        JudgeResult("x#g0", "Coherency", True, 9.0, 6.0),
    ]
    r = rollout_reward("A reply", meta, js, good)
    assert r.ok and r.value == pytest.approx((0.75 + 1.5) / 2)
    bad = [good[0], JudgeResult("x#g0", "Coherency", False, error="unparsable after 3 replies: no score pair found")]
    r = rollout_reward("A reply", meta, js, bad)
    assert not r.ok and r.value is None and "Coherency: unparsable" in r.error
    assert rollout_reward("  ", meta, js, good).error.startswith("judge: empty reply")
    with pytest.raises(ValueError, match="every weight is 0"):
        RewardSettings(judge=0.0)
    with pytest.raises(ValueError, match="unknown metric"):
        RewardSettings(metrics=["Charm"])


def test_grpo_configs_load_and_bad_keys_are_named():
    from pathlib import Path

    from mmrole.config import ConfigError
    from mmrole.rl.config import load_grpo_config

    repo = Path(__file__).resolve().parents[1]
    smoke = load_grpo_config(repo / "configs" / "grpo_smoke_cpu.yaml")
    assert smoke.grpo.group_size == 4 and not smoke.grpo.reward.uses_judge
    big = load_grpo_config(repo / "configs" / "grpo_7b_8gpu.yaml")
    assert big.grpo.judge.kind == "local" and big.scaling.num_workers == 6 and big.train.zero_stage == 2
    for override, key in (
        ("grpo.group_size=1", "grpo.group_size"),
        ("grpo.reward.metrics=[Charm]", "reward.metrics"),
        ("grpo.reward.judge=1", "grpo.judge"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("grpo.max_new_tokens=5000", "grpo.max_new_tokens"),
        ("grpo.clip_eps=fast", "grpo.clip_eps"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_grpo_config(repo / "configs" / "grpo_smoke_cpu.yaml", [override])
