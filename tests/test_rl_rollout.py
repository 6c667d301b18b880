"""Rollouts on a real tiny VLM: per-row seeding makes a rollout independent of its batch; training samples built
from them score the sampled tokens."""

from __future__ import annotations

import torch


def test_rollouts_are_seeded_per_row_and_train_on_the_sampled_tokens(tiny_models, tmp_path):
    from mmrole.models import VLMConfig, build_vlm
    from mmrole.rl.logprobs import sequence_logprobs
    from mmrole.rl.rollout import rollout_seed, sample_rollouts, training_sample
    from mmrole.train.row_encoder import RowEncoder
    from mmrole.train.synthetic import write_prepared

    prep = write_prepared(tmp_path / "prep", 3, seed=3)
    enc = RowEncoder({"model_path": tiny_models["agent"], "max_length": 512}, str(prep), "train", with_target=False)
    prompts = enc.encode_rows([0, 1, 2]).samples
    vlm = build_vlm(VLMConfig(model_path=tiny_models["agent"], device="cpu", dtype="float32"))
    seeds = [[rollout_seed(0, 1, p["id"], g) for g in range(2)] for p in prompts]
    full = sample_rollouts(vlm, prompts, 2, seeds, max_new_tokens=8)
    assert [(r.prompt, r.index) for r in full] == [(p, g) for p in range(3) for g in range(2)]
    assert all(r.error is None and r.token_ids for r in full)
    # The same rollout comes out of a batch of one, of another prompt order, or row by row.
    alone = sample_rollouts(vlm, prompts[1:2], 2, seeds[1:2], max_new_tokens=8)
    assert [r.token_ids for r in alone] == [r.token_ids for r in full[2:4]]
    chunked = sample_rollouts(vlm, prompts[:2], 2, seeds[:2], max_new_tokens=8, batch_size=3)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in full[:4]]
    # Different seeds (another step) give different rollouts; the two rollouts of a prompt differ.
    other = sample_rollouts(vlm, prompts[:1], 2, [[rollout_seed(0, 2, prompts[0]["id"], g) for g in range(2)]], 8)
    assert [r.token_ids for r in other] != [r.token_ids for r in full[:2]]
    assert full[0].token_ids != full[1].token_ids
    # A training sample has labels exactly on the sampled tokens; its log-prob is finite and negative.
    s = training_sample(prompts[0], full[0].token_ids)
    assert list(s["labels"][-len(full[0].token_ids) :]) == full[0].token_ids
    assert (s["labels"][: len(prompts[0]["input_ids"])] == -100).all()
    with torch.no_grad():
        lp = sequence_logprobs(vlm.model, vlm.to_device(vlm.pad_batch([s])))
    assert torch.isfinite(lp).all() and float(lp[0]) < 0
