"""Which generation prompts decode from one shared prefill: the cheapest cut of a batch into shared-prefix groups
and single rows (pure planning on token ids; :mod:`.shared_prefix` does the decoding)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def last_vision_index(encoded: dict) -> int:
    """Index of a prompt's last vision token (-1 without one)."""
    tt = encoded.get("mm_token_type_ids")
    if tt is None:
        return -1
    nz = np.flatnonzero(np.asarray(tt))
    return int(nz[-1]) if len(nz) else -1


def _vision_key(encoded: dict) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for k in ("pixel_values", "image_grid_thw"):
        if k in encoded:
            h.update(np.ascontiguousarray(np.asarray(encoded[k])).tobytes())
    return h.digest()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def plan_prefix_groups(
    encoded: Sequence[dict], hidden_size: int, min_shared_prefix: int
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Split rows into ``([(row indices, shared prefix length), ...], other row indices)``.

    Rows are sorted by (vision inputs, token ids), so rows with long common prefixes are neighbours. A group is
    a run of >= 2 neighbours with identical vision inputs whose common prefix holds every vision token, is at
    least ``min_shared_prefix`` tokens and leaves each row at least one token of its own. Among the ways to cut
    the sorted rows into groups and single rows, the cheapest is chosen (dynamic programming over the order) by
    the model's prefill work: tokens through the layers plus attention pairs weighted by ``1 / (6 * hidden
    size)`` (their FLOPs relative to a token's). So two answers about one image, sharing the profiles but not the
    history, become two groups of 8 metric prompts, not one group with long own parts."""
    n = len(encoded)
    ids = [np.asarray(e["input_ids"]) for e in encoded]
    vision_keys = [_vision_key(e) for e in encoded]
    # Big-endian bytes sort like the token sequences themselves (ids are non-negative).
    order = sorted(range(n), key=lambda i: (vision_keys[i], ids[i].astype(">i8").tobytes()))
    pair_cost = 1.0 / (6 * hidden_size)

    def prefill_cost(prefix: int, rows: int = 0, width: int = 0) -> float:
        """A prefix prefilled once, then ``rows`` own parts padded to ``width`` tokens."""
        return prefix + pair_cost * prefix * prefix / 2 + rows * width * (1 + pair_cost * (prefix + width / 2))

    lengths = [len(ids[i]) for i in order]
    vision_end = [last_vision_index(encoded[i]) + 1 for i in order]
    # lcp[k]: common prefix of sorted rows k-1 and k (0 across different vision inputs).
    lcp = [0] + [
        _common_prefix(ids[order[k - 1]], ids[order[k]]) if vision_keys[order[k - 1]] == vision_keys[order[k]] else 0
        for k in range(1, n)
    ]
    best = [0.0] * (n + 1)  # best[j]: cheapest cut of sorted rows [0, j)
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last piece, its prefix; 0 = single row)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1] + prefill_cost(lengths[j - 1]), (j - 1, 0)
        prefix, longest, last_vision = lengths[j - 1] - 1, lengths[j - 1], vision_end[j - 1]
        for i in range(j - 2, -1, -1):  # piece = sorted rows [i, j)
            prefix = min(prefix, lcp[i + 1], lengths[i] - 1)
            longest, last_vision = max(longest, lengths[i]), max(last_vision, vision_end[i])
            if prefix < max(min_shared_prefix, last_vision):
                break  # only shrinks further left
            cost = best[i] + prefill_cost(prefix, j - i, longest - prefix)
            if cost < best[j]:
                best[j], cut[j] = cost, (i, prefix)
    groups: list[tuple[list[int], int]] = []
    plain: list[int] = []
    j = n
    while j > 0:
        i, prefix = cut[j]
        if prefix:
            groups.append(([order[k] for k in range(i, j)], prefix))
        else:
            plain.append(order[j - 1])
        j = i
    return groups[::-1], sorted(plain)
