"""Learning-rate schedules as pure functions of the optimizer step (wrapped in a torch LambdaLR by the shell)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to ``lr`` over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio * lr`` at
    ``total_steps``."""

    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in ("cosine", "constant"):
            raise ValueError(f"unknown LR schedule {self.kind!r} (cosine or constant)")
        if self.total_steps < 0 or self.warmup_steps < 0:
            raise ValueError("LR schedule steps must be >= 0")

    def multiplier(self, step: int) -> float:
        """LR factor for the optimizer step with 0-based index ``step`` (the value LambdaLR sees)."""
        if step < self.warmup_steps:
            # (step + 1) / warmup: the first update already moves (a zero LR step would be wasted work).
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.multiplier(step)


def make_schedule(
    total_steps: int,
    kind: str = "cosine",
    warmup_ratio: float = 0.0,
    warmup_steps: Optional[int] = None,
    min_lr_ratio: float = 0.0,
) -> LRSchedule:
    """Warmup given in steps wins over the ratio; warmup never exceeds the run."""
    w = warmup_steps if warmup_steps is not None else int(math.ceil(warmup_ratio * total_steps))
    return LRSchedule(total_steps=total_steps, warmup_steps=min(w, total_steps), kind=kind, min_lr_ratio=min_lr_ratio)
