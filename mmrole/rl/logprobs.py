"""Token and sequence log-probabilities of reply tokens under a causal (V)LM, pure torch.

Shared by DPO (sequence log-probs of chosen/rejected replies) and GRPO (per-token log-probs of rollouts). Labels
follow the SFT convention: ``-100`` marks prompt and padding tokens; the logit at position ``t`` predicts the
label at ``t + 1``, so outputs have ``T - 1`` columns.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next label under ``logits``: ``(logp [B, T-1], mask [B, T-1])``.

    ``logp[b, t] = log softmax(logits[b, t])[labels[b, t + 1]]``; masked positions (label ``-100``) hold 0 and
    ``mask`` (float, 1 = reply token) says which count. Computed in float32 as gather minus logsumexp, so no
    ``[B, T, V]`` log-softmax copy is kept beyond the logits themselves."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"token_logprobs: logits [B,T,V] and labels [B,T] expected, got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    safe = torch.where(mask, target, torch.zeros_like(target))
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1)
    logp = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logp, mask.to(logp.dtype)


def model_logits(model, batch: dict) -> torch.Tensor:
    """Logits of ``model`` (an HF module) on ``batch`` without letting the model compute its own loss."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits


def sequence_logprobs(model, batch: dict, average: bool = False) -> torch.Tensor:
    """Per-row sum (or mean, when ``average``) of the reply-token log-probs of a padded batch: ``Tensor[B]``.

    ``batch`` is what ``VLM.pad_batch`` gives (on the model's device), with ``labels``. A row with no reply token
    has sum 0 and, averaged, 0 (its count is clamped to 1)."""
    logp, mask = token_logprobs(model_logits(model, batch), batch["labels"])
    total = logp.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1.0)
    return total
