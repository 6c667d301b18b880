"""Near-duplicate detection across dialogues: character n-gram shingles, Jaccard similarity, MinHash-free.

Exact Jaccard against every kept dialogue of the same character (dialogues of different characters rarely
collide and the per-character sets stay small: images x types x count).
"""

from __future__ import annotations

import re

_SPACE = re.compile(r"\s+")


def shingles(text: str, n: int = 5) -> frozenset:
    """Character n-grams of the lower-cased, space-normalised text."""
    t = _SPACE.sub(" ", text.lower()).strip()
    if len(t) <= n:
        return frozenset([t]) if t else frozenset()
    return frozenset(t[i : i + n] for i in range(len(t) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class NearDuplicateIndex:
    """Keeps the shingles of accepted texts per group; ``check`` returns the id of a near-duplicate or None."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._kept: dict[str, list[tuple[str, frozenset]]] = {}

    def check_and_add(self, group: str, item_id: str, text: str) -> tuple[str, float] | None:
        sh = shingles(text)
        for other_id, other in self._kept.get(group, []):
            s = jaccard(sh, other)
            if s >= self.threshold:
                return other_id, s
        self._kept.setdefault(group, []).append((item_id, sh))
        return None
