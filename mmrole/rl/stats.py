"""Paired comparison of two measurements of the same prompts (e.g. held-out reward before and after GRPO)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional


def paired_bootstrap(
    before: Mapping[str, Optional[float]],
    after: Mapping[str, Optional[float]],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Mean of ``after - before`` over the prompts scored in both, with a seeded percentile bootstrap CI
    (prompts resampled with replacement) and the share of resamples whose mean difference is <= 0 (a one-sided
    p-value). Prompts missing or failed (None) in either are left out and counted."""
    import numpy as np

    keys = [k for k in before if k in after and before[k] is not None and after[k] is not None]
    if not keys:
        return {"n": 0, "left_out": len(set(before) | set(after)), "mean_diff": None, "ci": None, "p_le_0": None}
    d = np.array([after[k] - before[k] for k in keys], dtype=float)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boots, [50 * (1 - confidence), 50 * (1 + confidence)])
    return {
        "n": len(keys),
        "left_out": len(set(before) | set(after)) - len(keys),
        "mean_diff": float(d.mean()),
        "ci": [float(lo), float(hi)],
        "p_le_0": float((boots <= 0).mean()),
    }
