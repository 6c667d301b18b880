"""Statistics shared by the report and judge agreement: correlations (Pearson, Spearman) and score vs answer
length."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def ranks(x: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    return pearson(ranks(x), ranks(y)) if len(x) >= 2 else None


@dataclass
class LengthBias:
    """Score vs answer length for one model: correlation of per-sample mean A/B with the answer's length in
    characters, and the mean A/B per length quartile (Q1 = shortest)."""

    model: str
    n: int
    pearson: Optional[float]
    spearman: Optional[float]
    quartile_means: list  # [(max length in the quartile, mean A/B, n)]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def length_bias(per_sample: Mapping[str, list[tuple[int, float]]]) -> list[LengthBias]:
    """``{model: [(answer length, mean A/B of the sample), ...]}`` -> one :class:`LengthBias` per model."""
    out = []
    for model, pts in per_sample.items():
        pts = sorted(pts)
        n = len(pts)
        quartiles = []
        for q in range(4):
            part = pts[q * n // 4 : (q + 1) * n // 4]
            if part:
                quartiles.append((part[-1][0], sum(r for _, r in part) / len(part), len(part)))
        lengths, ratios = [float(x) for x, _ in pts], [r for _, r in pts]
        out.append(LengthBias(model, n, pearson(lengths, ratios), spearman(lengths, ratios), quartiles))
    return out
