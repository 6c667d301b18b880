"""mmrole.rl.logprobs: shifted token log-probs against a hand-built log-softmax, and sequence sums / means on a
real tiny VLM agreeing with its own cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch


def test_token_logprobs_hand_computed():
    from mmrole.rl.logprobs import token_logprobs

    # B=1, T=3, V=2: logits at t=0 predict labels[1], at t=1 predict labels[2]; the last logit predicts nothing.
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [9.0, -9.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    logp, mask = token_logprobs(logits, labels)
    assert logp.shape == mask.shape == (1, 2)
    torch.testing.assert_close(logp, torch.tensor([[math.log(3 / 4), math.log(4 / 5)]]))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1.0]]))
    # A masked label holds 0 and mask 0, whatever the logits say.
    logp, mask = token_logprobs(logits, torch.tensor([[5, -100, 0]]))
    torch.testing.assert_close(mask, torch.tensor([[0.0, 1.0]]))
    assert logp[0, 0] == 0.0 and logp[0, 1] == pytest.approx(math.log(4 / 5))


def test_token_logprobs_matches_log_softmax_and_rejects_bad_shapes():
    from mmrole.rl.logprobs import token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, 5:] = -100
    logp, mask = token_logprobs(logits, labels)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(2, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = ref * (labels[:, 1:] != -100)
    torch.testing.assert_close(logp, ref)
    assert int(mask.sum()) == int((labels[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits, labels[:, :-1])


def test_sequence_logprobs_on_a_tiny_vlm(tiny_models, tmp_path):
    from mmrole.models import VLMConfig, build_vlm
    from mmrole.rl.logprobs import sequence_logprobs
    from mmrole.train.row_encoder import RowEncoder
    from mmrole.train.synthetic import write_prepared

    prep = write_prepared(tmp_path / "prep", 3, seed=3)
    samples = (
        RowEncoder({"model_path": tiny_models["agent"], "max_length": 512}, str(prep), "train")
        .encode_rows([0, 1, 2])
        .samples
    )
    vlm = build_vlm(VLMConfig(model_path=tiny_models["agent"], device="cpu", dtype="float32"))
    batch = vlm.to_device(vlm.pad_batch(samples))
    with torch.no_grad():
        total = sequence_logprobs(vlm.model, batch)
        mean = sequence_logprobs(vlm.model, batch, average=True)
        n = (batch["labels"][:, 1:] != -100).sum(-1)
        assert total.shape == (3,) and bool((total < 0).all())
        torch.testing.assert_close(mean, total / n)
        # Row by row, the mean is the model's own token cross-entropy (right padding does not change a row).
        for i, s in enumerate(samples):
            one = vlm.to_device(vlm.pad_batch([s]))
            torch.testing.assert_close(-mean[i], vlm.model(**one).loss, rtol=1e-4, atol=1e-5)
