"""The data stream of a training recipe: this rank's micro-batches, from the resume position to the end of the last
epoch, encoded by a Ray Data pipeline (:mod:`mmrole.ray_data_ingest`), and the model batches made from them.

What a rank trains on is fixed by :mod:`mmrole.train.data_order` (its strided share of the (seed, epoch)
permutation), so a rerun or a resumed run reads exactly the same rows in the same order."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mmrole.train.config import TrainJobConfig
from mmrole.train.data_order import MicroBatchPlan, rank_micro_batches
from mmrole.train.packing import pack_samples, packed_batch
from mmrole.train.rejects import REJECTS_DIR


@dataclass
class MicroBatch:
    """One micro-batch of this rank: its plan (epoch, row indices, end position) and the encoded samples (rejected
    rows left out), and how long the trainer waited for it."""

    plan: MicroBatchPlan
    samples: list[dict] = field(default_factory=list)
    wait_s: float = 0.0


class RankDataStream:
    """This rank's encoded micro-batches (training) and held-out rows (validation)."""

    def __init__(
        self,
        cfg: TrainJobConfig,
        run_dir: Path,
        n_rows: int,
        rank: int,
        world: int,
        encoder_options: Optional[dict] = None,
    ):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.n_rows = int(n_rows)  # rows trained on per epoch; the next data.eval_rows rows are held out
        self.n_eval = int(cfg.data.eval_rows)
        self.rank, self.world = rank, world
        self.encoder_options = dict(encoder_options or {})  # extra RowEncoder arguments (e.g. what a row holds)
        self.encoders = None

    def start_encoders(self, depth: int) -> None:
        """This rank's encoders (a Ray Data pipeline over CPU actors, or a local thread); ``depth`` micro-batches
        are encoded ahead."""
        from mmrole.ray_data_ingest import RankEncoders

        if self.encoders is not None:
            return
        d = self.cfg.data
        self.encoders = RankEncoders(
            d.encode_actors,
            d.encode_num_cpus,
            max(d.prefetch_batches, depth),
            memory_mb=d.prefetch_memory_mb,
            local_node=d.encode_on_worker_node,
            model=self.cfg.model.to_dict(),
            prepared=d.prepared,
            split=self.cfg.split,
            max_rows=self.n_rows + self.n_eval,
            rejects_dir=str(self.run_dir / REJECTS_DIR),
            **self.encoder_options,
        )

    def micro_batches(self, epoch: int, epoch_position: int, depth: int) -> Iterator[MicroBatch | int]:
        """This rank's micro-batches from (``epoch``, ``epoch_position``) to the end of the last epoch; an ``int``
        marks the end of that epoch. The encoding starts at once (see :meth:`RankEncoders.encode`)."""
        self.start_encoders(depth)
        d, t = self.cfg.data, self.cfg.train
        items: list[MicroBatchPlan | int] = []  # plans, and after each epoch's plans that epoch's number
        start = epoch_position
        while epoch < t.epochs:
            items.extend(
                rank_micro_batches(self.n_rows, d.shuffle_seed, epoch, start, self.world, self.rank, t.micro_batch_size)
            )
            items.append(epoch)
            epoch, start = epoch + 1, 0
        encoded = self.encoders.encode([p for p in items if not isinstance(p, int)])
        return self._walk(items, encoded)

    @staticmethod
    def _walk(items: list[MicroBatchPlan | int], encoded: Iterator) -> Iterator[MicroBatch | int]:
        try:
            t0 = time.time()
            for item in items:
                if isinstance(item, int):
                    yield item
                    continue
                plan, rows = next(encoded)
                yield MicroBatch(plan, rows.samples, time.time() - t0)
                t0 = time.time()
        finally:
            encoded.close()  # stops the Ray Data pipeline when training ends before the data does (max_steps)

    def validation_batches(self) -> Iterator[list[dict]]:
        """This rank's fixed strided share of the held-out rows, in micro-batches, encoded in a worker thread (equal
        counts on every rank, so every rank runs the same forward passes)."""
        mb = self.cfg.train.micro_batch_size
        mine = list(range(self.n_rows + self.rank, self.n_rows + self.n_eval, self.world))
        mine = mine[: self.n_eval // self.world]
        plans = [MicroBatchPlan(-1, tuple(mine[i : i + mb]), 0) for i in range(0, len(mine), mb)]
        for _, encoded in self.encoders.encode_local(plans):
            yield encoded.samples

    def close(self) -> None:
        if self.encoders is not None:
            self.encoders.close()


class ModelBatcher:
    """Encoded samples -> model batches on the model's device: packed rows (``data.packing``) or right-padded
    samples; an empty micro-batch (every row rejected) becomes a filler sample, to be weighted 0."""

    def __init__(self, cfg: TrainJobConfig, vlm: Any):
        self.vlm = vlm
        self.max_length = cfg.model.max_length
        self.packing = pack_samples(cfg, vlm.family)

    @functools.cached_property
    def filler(self) -> dict:
        """An encoded sample for a micro-batch whose rows were all rejected (run with zero weight)."""
        from mmrole.train.row_encoder import filler_sample

        return filler_sample(self.vlm.encoder)

    def __call__(self, rows: list[dict]) -> dict:
        rows = rows or [self.filler]
        if self.packing:
            return self.vlm.to_device(packed_batch(self.vlm, rows, self.max_length))
        batch = self.vlm.pad_batch(rows)
        batch.pop("id", None)
        return self.vlm.to_device(batch)
