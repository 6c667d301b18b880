"""One optimizer step's arithmetic, framework-free (torch only): token-weighted loss and named accumulators.

The loss of a step is the sum of the target-token losses of all its micro-batches on all ranks divided by the
number of target tokens of the whole global batch (``num_tokens``, counted before the step's forward passes and
summed over ranks). Each micro-batch contributes ``loss_sum * world / num_tokens`` to ``backward``: DeepSpeed
averages gradients over the ``world`` data-parallel ranks (and we pass ``scale_wrt_gas=False`` so it does not also
divide by the accumulation steps), so the step's gradient is the gradient of the token mean. A long sample weighs
as many tokens as it has, whatever micro-batch or rank it lands on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from mmrole.models.batching import IGNORE_INDEX


def count_target_tokens(labels: Any) -> int:
    """Supervised tokens of a (padded or packed) label tensor/array, as the causal-LM loss counts them: the label
    at position 0 is never predicted (labels are shifted by one)."""
    if isinstance(labels, torch.Tensor):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return int((np.asarray(labels)[..., 1:] != IGNORE_INDEX).sum())


def summed_token_loss(model, batch: dict) -> torch.Tensor:
    """Sum (not mean) of the target-token cross-entropies of one micro-batch (transformers' ``num_items_in_batch``
    divides the summed loss by that number; 1 keeps the sum)."""
    one = torch.ones((), device=batch["labels"].device)
    return model(**batch, num_items_in_batch=one).loss


def backward_scale(world_size: int, num_tokens: int) -> float:
    """Factor for a micro-batch's summed loss so that, after DeepSpeed's mean over ranks, the step's gradient is the
    gradient of the global token mean."""
    return float(world_size) / float(max(num_tokens, 1))


@dataclass
class StepTotals:
    """What one rank accumulates over the micro-batches of one optimizer step (summed over ranks at the end)."""

    loss_sum: float = 0.0  # summed target-token loss (kept on the device until the step ends)
    micro_batches: int = 0
    samples: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    target_tokens: int = 0
    data_wait_s: float = 0.0

    def as_list(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def from_list(cls, values: list[float]) -> StepTotals:
        names = [f.name for f in fields(cls)]
        kw = {n: (v if n in ("loss_sum", "data_wait_s") else int(round(v))) for n, v in zip(names, values)}
        return cls(**kw)
