"""Direct preference optimisation losses, pure torch (no Ray, no DeepSpeed).

Inputs are per-pair sequence log-probs of the chosen and rejected replies under the trained policy and the frozen
reference (:func:`mmrole.rl.logprobs.sequence_logprobs`). With ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta h)``, optionally label-smoothed (cDPO):
  ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
* ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` on the summed log-probs;
* ``sigmoid_norm``: the sigmoid loss on per-token *mean* log-probs (length-normalised: a long reply cannot win by
  its length alone; the caller passes means, see :data:`AVERAGED`).

The implicit rewards are ``beta (pi - ref)``; a pair counts as correct when the chosen reward exceeds the
rejected one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "sigmoid_norm")
AVERAGED = {"sigmoid": False, "ipo": False, "sigmoid_norm": True}  # whether the loss takes per-token means


@dataclass
class DPOOutput:
    """Per-pair tensors ``[B]``: the loss, the implicit rewards of both replies and their margin."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def correct(self) -> torch.Tensor:
        return (self.margins > 0).to(self.losses.dtype)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Per-pair DPO loss and implicit rewards; gradients flow through the policy terms only."""
    if loss not in LOSSES:
        raise ValueError(f"dpo loss {loss!r}: expected one of {LOSSES}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return DPOOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


@dataclass
class PairSums:
    """What a step or a validation pass adds up over pairs (then all-reduced and divided by ``pairs``)."""

    pairs: float = 0.0
    loss: float = 0.0
    correct: float = 0.0
    margin: float = 0.0
    chosen_reward: float = 0.0
    rejected_reward: float = 0.0
    logp_chosen: float = 0.0
    logp_rejected: float = 0.0

    NAMES = ("pairs", "loss", "correct", "margin", "chosen_reward", "rejected_reward", "logp_chosen", "logp_rejected")

    def add(self, out: DPOOutput, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> None:
        self.pairs += float(out.losses.numel())
        self.loss += float(out.losses.detach().sum())
        self.correct += float(out.correct.sum())
        self.margin += float(out.margins.sum())
        self.chosen_reward += float(out.chosen_rewards.sum())
        self.rejected_reward += float(out.rejected_rewards.sum())
        self.logp_chosen += float(policy_chosen.detach().sum())
        self.logp_rejected += float(policy_rejected.detach().sum())

    def as_list(self) -> list[float]:
        return [float(getattr(self, n)) for n in self.NAMES]

    @classmethod
    def from_list(cls, values: list[float]) -> PairSums:
        return cls(**dict(zip(cls.NAMES, values)))

    def means(self, prefix: str = "") -> dict:
        """Per-pair means: ``reward_accuracy``, ``reward_margin``, ... (``prefix`` e.g. ``eval_``)."""
        n = max(self.pairs, 1.0)
        return {
            f"{prefix}dpo_loss": self.loss / n,
            f"{prefix}reward_accuracy": self.correct / n,
            f"{prefix}reward_margin": self.margin / n,
            f"{prefix}chosen_reward": self.chosen_reward / n,
            f"{prefix}rejected_reward": self.rejected_reward / n,
            f"{prefix}logp_chosen": self.logp_chosen / n,
            f"{prefix}logp_rejected": self.logp_rejected / n,
            f"{prefix}pairs": int(self.pairs),
        }
