"""GRPO arithmetic (pure torch): group-normalised advantages, the clipped policy objective and the k3 KL estimate
to the reference policy, summed over reply tokens so the recipe can weight every token of the global batch alike.

Per token ``t`` of rollout ``i`` (reply tokens only):

    ratio  = exp(logp - old_logp)
    pg     = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i)
    kl     = exp(ref_logp - logp) - (ref_logp - logp) - 1          (k3: unbiased, always >= 0)
    loss_t = pg + beta * kl

With one optimizer step per batch of rollouts (as here) ``old_logp`` is the detached ``logp``: the ratio is 1,
its gradient is the policy gradient ``A * grad logp``, and clipping starts to matter once a batch is reused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch


def group_advantages(
    rewards: Sequence[Optional[float]], group_size: int, normalize_std: bool = True, eps: float = 1e-4
) -> tuple[list[float], list[bool]]:
    """Advantages of rollouts laid out group by group (``group_size`` consecutive rollouts per prompt).

    ``A_i = (r_i - mean(group)) / (std(group) + eps)`` over the group's successful rollouts (sample std, as TRL;
    ``normalize_std=False``: mean-centred only). A failed rollout (``None``) gets 0 and ``False``; so does every
    rollout of a group with fewer than 2 successes (no comparison, no signal). Returns ``(advantages, usable)``."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {group_size}")
    adv: list[float] = []
    usable: list[bool] = []
    for g in range(0, len(rewards), group_size):
        grp = rewards[g : g + group_size]
        ok = [r for r in grp if r is not None]
        if len(ok) < 2:
            adv += [0.0] * len(grp)
            usable += [False] * len(grp)
            continue
        mean = sum(ok) / len(ok)
        std = math.sqrt(sum((r - mean) ** 2 for r in ok) / (len(ok) - 1))
        denom = (std + eps) if normalize_std else 1.0
        for r in grp:
            adv.append(0.0 if r is None else (r - mean) / denom)
            usable.append(r is not None)
    return adv, usable


@dataclass
class TokenSums:
    """Sums over the reply tokens of a micro-batch (summed over ranks by the recipe, then divided by tokens)."""

    loss: torch.Tensor  # with gradient
    pg: float
    kl: float
    clipped: float  # tokens where the clipped term was the smaller one
    tokens: float


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
) -> TokenSums:
    """Summed GRPO loss over the tokens where ``mask`` is 1 (``[B, T]`` tensors; ``advantages`` ``[B]``)."""
    if not (logp.shape == old_logp.shape == ref_logp.shape == mask.shape) or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"grpo_token_loss: shapes logp {tuple(logp.shape)}, old {tuple(old_logp.shape)}, ref "
            f"{tuple(ref_logp.shape)}, mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}"
        )
    mask = mask.to(logp.dtype)
    a = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    surr1 = ratio * a
    surr2 = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a
    pg = -torch.minimum(surr1, surr2)
    diff = ref_logp - logp
    kl = torch.exp(diff) - diff - 1.0
    per_token = (pg + kl_coef * kl) * mask
    with torch.no_grad():
        clipped = ((surr2 < surr1).to(mask.dtype) * mask).sum()
    return TokenSums(
        loss=per_token.sum(),
        pg=float((pg * mask).sum().detach()),
        kl=float((kl * mask).sum().detach()),
        clipped=float(clipped),
        tokens=float(mask.sum()),
    )
