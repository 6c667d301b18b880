"""Statistics of the converse report: seeded bootstrap intervals over conversations and repetition (the share of a
turn's word n-grams, characters for Chinese, already said in the speaker's earlier turns). Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mmrole.data.records import has_cjk


def mean_or_none(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def bootstrap_ci(values: Sequence[float], n_boot: int, seed: int) -> Optional[tuple[float, float]]:
    """Percentile 95% interval of the mean (None with fewer than 2 values or no resamples)."""
    if len(values) < 2 or n_boot <= 0:
        return None

    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=float)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class Estimate:
    mean: Optional[float]
    n: int
    ci: Optional[tuple[float, float]] = None

    @classmethod
    def of(cls, values: Sequence[float], n_boot: int, seed: int) -> Estimate:
        return cls(mean_or_none(values), len(values), bootstrap_ci(values, n_boot, seed))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "n": self.n, "ci": list(self.ci) if self.ci else None}

    def fmt(self, digits: int = 2) -> str:
        if self.mean is None:
            return "n/a"
        ci = f" [{self.ci[0]:.{digits}f}, {self.ci[1]:.{digits}f}]" if self.ci else ""
        return f"{self.mean:.{digits}f}{ci} (n={self.n})"


# ------------------------------------------------------------------------------------------- repetition
_WORD = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased words; characters for Chinese text (no spaces between words)."""
    if has_cjk(text):
        return [c for c in text if not c.isspace() and (c.isalnum() or has_cjk(c))]
    return [w.lower() for w in _WORD.findall(text)]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    t = tokens(text)
    return {tuple(t[i : i + n]) for i in range(len(t) - n + 1)}


def repetition_by_turn(texts: Sequence[str], n: int = 3) -> list[Optional[float]]:
    """For each of an agent's turns after the first: the share of its n-grams already said in its earlier turns
    (None for the first turn, or a turn shorter than n words)."""
    seen: set = set()
    out: list[Optional[float]] = []
    for i, text in enumerate(texts):
        g = ngrams(text, n)
        out.append(len(g & seen) / len(g) if i > 0 and g else None)
        seen |= g
    return out
