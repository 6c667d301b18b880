"""Training data for Ray Train workers: each rank reads its fixed share of an epoch's row order
(:mod:`mmrole.train.data_order`) and gets the rows encoded by CPU actors it owns (or in a thread of its own with
``data.encode_actors: 0``).

Requests go out ahead (``data.prefetch_batches`` micro-batches) and results are taken in submission order, so the
rows of a rank's micro-batch are the same whatever the timing: a rerun, or a run resumed from a checkpoint, trains
on exactly the same rows in the same order. Rejected rows (undecodable image, too long) are recorded by id in the
run's rejects and left out of their micro-batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import pyarrow.parquet as pq
import ray

from mmrole.train.data_order import MicroBatchPlan
from mmrole.train.row_encoder import EncodedRows, RowEncoder, ordered_prefetch


@dataclass
class IngestSource:
    """What a training run reads: the split's shards, where images live, and how many rows there are."""

    files: list[str]
    images_root: str
    n_rows: int  # rows the run reads per epoch (after max_rows), before rejects
    split: str
    prepared: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_source(prepared: str, split: str, max_rows: Optional[int] = None) -> IngestSource:
    """Shards + images root from the prepared folder's manifest; errors name the folder and split."""
    from mmrole.data.prepared import load_manifest, split_files

    manifest = load_manifest(prepared)
    files = [str(f) for f in split_files(prepared, split)]
    if not files:
        raise FileNotFoundError(
            f"{prepared}: the prepared data has no {split!r} split (splits: "
            f"{sorted(manifest.get('splits', {}))}); for the reward model, build RM_data first "
            "(jobs/build_rm_data.py) and re-run `mmrole data prepare`"
        )
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{prepared}: shard(s) listed in manifest.json are missing: {missing[:3]}")
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if max_rows is not None:
        n = min(n, max_rows)
    return IngestSource(
        files=files, images_root=str(manifest["images_root"]), n_rows=n, split=split, prepared=str(prepared)
    )


class RankEncoders:
    """The encoders one train worker uses: ``n_actors`` Ray actors (round-robin), or a local thread when 0."""

    def __init__(self, n_actors: int, num_cpus: float, depth: int, **encoder_kw):
        self.depth = max(1, depth)
        self.actors = []
        self.local: Optional[RowEncoder] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        if n_actors > 0:
            actor_cls = ray.remote(num_cpus=num_cpus)(RowEncoder)
            self.actors = [actor_cls.remote(**encoder_kw) for _ in range(n_actors)]
            self._filler = ray.get(self.actors[0].filler_sample.remote())
        else:
            self.local = RowEncoder(**encoder_kw)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmrole-encode")
            self._filler = self.local.filler_sample()
        self._next = 0

    @property
    def filler(self) -> dict:
        return self._filler

    def _submit(self, plan: MicroBatchPlan):
        if self.local is not None:
            return self._pool.submit(self.local.encode_rows, plan.rows)
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return actor.encode_rows.remote(plan.rows)

    def _get(self, handle) -> EncodedRows:
        return handle.result() if self.local is not None else ray.get(handle)

    def encode(self, plans: Iterator[MicroBatchPlan]) -> Iterator[tuple[MicroBatchPlan, EncodedRows]]:
        """Encoded micro-batches in plan order, ``depth`` requests ahead."""
        return ordered_prefetch(plans, self._submit, self._get, self.depth)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
