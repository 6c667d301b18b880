"""Which rows a rank trains on, and in what order: a pure function of (seed, epoch, position, world, rank).

An epoch's row order is a permutation of the row indices ``0..n_rows-1`` drawn from ``(seed, epoch)`` alone.
Rank ``r`` of ``world`` takes positions ``start + r, start + r + world, ...`` of that permutation (strided), and all
ranks take the same count, so after every micro-batch round the rows consumed by all ranks together are exactly a
*prefix* of the permutation. The checkpoint stores that prefix length (``position``); a resumed run continues with
the rest, whatever the world size: a run stopped at any step and resumed trains on exactly the rows an uninterrupted
run would have (same world size), and an elastic restart at another world size never trains a row twice in the
epoch. The ``n_rows - start`` positions left over by equal shares (fewer than ``world``) are skipped that epoch;
the next epoch's permutation differs, so it is not always the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of one epoch in training order (int64), reproducible from (seed, epoch)."""
    rng = np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, int(epoch)]))
    return rng.permutation(int(n_rows)).astype(np.int64)


@dataclass(frozen=True)
class MicroBatchPlan:
    """One micro-batch of a rank: the row indices to read, and the epoch position once all ranks consumed theirs."""

    epoch: int
    rows: tuple[int, ...]
    end_position: int


def rank_micro_batches(
    n_rows: int, seed: int, epoch: int, start: int, world: int, rank: int, micro_batch: int
) -> Iterator[MicroBatchPlan]:
    """Micro-batches of ``rank`` for the rest of ``epoch`` from global position ``start`` (equal count per rank)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    perm = epoch_permutation(n_rows, seed, epoch)
    per_rank = max(n_rows - start, 0) // world
    for lo in range(0, per_rank, micro_batch):
        hi = min(lo + micro_batch, per_rank)
        rows = tuple(int(perm[start + j * world + rank]) for j in range(lo, hi))
        yield MicroBatchPlan(epoch, rows, start + hi * world)


def micro_batches_left(n_rows: int, start: int, world: int, micro_batch: int) -> int:
    """How many micro-batches each rank still has in an epoch from position ``start``."""
    per_rank = max(n_rows - start, 0) // world
    return -(-per_rank // micro_batch)
