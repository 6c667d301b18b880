"""Training data for Ray Train workers, through Ray Data.

Each rank's share of an epoch is fixed by :mod:`mmrole.train.data_order` (a permutation of (seed, epoch), strided
by rank). The rank turns its micro-batch plans for the rest of the run into a Ray Data dataset (one row per
micro-batch: the row indices) and maps it over an actor pool of ``data.encode_actors`` encoders, which read the
rows from the prepared Parquet shards, decode the images and run the processor. The dataset runs with
``preserve_order``, so the rank receives its micro-batches in plan order whatever the timing: a rerun, or a run
resumed from a checkpoint, trains on exactly the same rows in the same order (the order is checked as the batches
arrive). ``data.encode_actors: 0`` encodes in a thread of the worker instead (debugging, no Ray Data). Rejected
rows (undecodable image, too long) are recorded by id in the run's rejects and left out of their micro-batch.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
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


NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node (its id)


class EncodeRowsUDF:
    """Ray Data ``map_batches`` UDF (actor pool): each input row is one micro-batch plan (``index``, ``rows``); each
    output row carries the same ``index`` and the micro-batch's :class:`EncodedRows` as Arrow IPC bytes
    (:meth:`EncodedRows.to_bytes`: variable-shaped arrays of several keys per sample, and the rejects)."""

    def __init__(self, **encoder_kw):
        self.encoder = RowEncoder(**encoder_kw)

    def __call__(self, batch: dict) -> dict:
        encoded = [self.encoder.encode_rows([int(i) for i in rows]).to_bytes() for rows in batch["rows"]]
        return {"index": np.asarray(batch["index"], dtype=np.int64), "encoded": np.array(encoded, dtype=object)}


@contextmanager
def _ordered_data_context(object_store_bytes: Optional[int]):
    """Datasets created inside take an execution context that keeps block order, holds at most
    ``object_store_bytes`` of encoded data ahead of the consumer (None: Ray Data's default share of the cluster's
    object store, which every rank's pipeline would claim for itself) and prints no progress bars. The process-wide
    context is restored afterwards (a Dataset copies the context when it is created)."""
    ctx = ray.data.DataContext.get_current()
    opts = ctx.execution_options
    saved = opts.preserve_order, opts.resource_limits, ctx.enable_progress_bars, ctx.print_on_execution_start
    opts.preserve_order = True
    if object_store_bytes is not None:
        opts.resource_limits = ray.data.ExecutionResources.for_limits(object_store_memory=object_store_bytes)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield
    finally:
        opts.preserve_order, opts.resource_limits, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


class RankEncoders:
    """How one train worker gets its micro-batches encoded: a Ray Data pipeline over ``n_actors`` encoder actors,
    or a local thread when ``n_actors`` is 0 (debugging; no Ray Data)."""

    def __init__(
        self,
        n_actors: int,
        num_cpus: float,
        depth: int,
        memory_mb: Optional[int] = None,
        local_node: bool = False,
        **encoder_kw,
    ):
        self.n_actors = int(n_actors)
        self.num_cpus = float(num_cpus)
        self.depth = max(1, depth)
        self.object_store_bytes = int(memory_mb) * 2**20 if memory_mb else None
        # Encoder actors on this worker's node: encoded tensors (MBs per sample) never cross the network. Asked only
        # when there are actors: the runtime context would start a Ray instance in a process that has none.
        local = local_node and self.n_actors > 0
        self.label_selector = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()} if local else None
        self.encoder_kw = encoder_kw
        self._streams: list[BackgroundIterator] = []
        self._local: Optional[RowEncoder] = None
        self._pool: Optional[ThreadPoolExecutor] = None

    def encode_local(self, plans: Iterable[MicroBatchPlan]) -> Iterator[tuple[MicroBatchPlan, EncodedRows]]:
        """Encoded micro-batches in plan order, from a thread of this worker (``depth`` requests ahead). Used with
        ``encode_actors: 0`` and for the held-out validation rows: a second actor pool started mid-run could wait
        forever for CPUs the training pipeline holds."""
        if self._local is None:
            self._local = RowEncoder(**self.encoder_kw)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmrole-encode")
        return ordered_prefetch(
            plans, lambda p: self._pool.submit(self._local.encode_rows, p.rows), lambda f: f.result(), self.depth
        )

    def dataset(self, plans: Sequence[MicroBatchPlan]) -> ray.data.Dataset:
        """The Ray Data pipeline of ``plans``: one input row per micro-batch (blocks of ``depth`` plans), encoded by
        an actor pool; the output keeps the input order."""
        items = [{"index": i, "rows": list(p.rows)} for i, p in enumerate(plans)]
        with _ordered_data_context(self.object_store_bytes):
            ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // self.depth)))
            return ds.map_batches(
                EncodeRowsUDF,
                fn_constructor_kwargs=self.encoder_kw,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=self.n_actors),
                num_cpus=self.num_cpus,  # Ray Data restarts a lost actor and retries its block (its defaults)
                label_selector=self.label_selector,
            )

    def encode(self, plans: Iterable[MicroBatchPlan]) -> Iterator[tuple[MicroBatchPlan, EncodedRows]]:
        """Encoded micro-batches in plan order. Through Ray Data the pipeline starts at once, in a background thread
        (so the encoder actors start while the worker builds its model), ``depth`` micro-batches ahead; with no
        actors, :meth:`encode_local`."""
        if self.n_actors <= 0:
            return self.encode_local(plans)
        plans = list(plans)
        stream = BackgroundIterator(lambda: self._ray_data_batches(plans), self.depth)
        self._streams.append(stream)
        return stream

    def _ray_data_batches(self, plans: list[MicroBatchPlan]) -> Iterator[tuple[MicroBatchPlan, EncodedRows]]:
        if not plans:
            return
        ds = self.dataset(plans)
        batches = iter(ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=self.depth))
        expected = 0
        try:
            for batch in batches:
                for index, blob in zip(batch["index"], batch["encoded"]):
                    if int(index) != expected:  # preserve_order makes a rerun/resume exact: never go on without it
                        raise RuntimeError(f"Ray Data returned micro-batch {int(index)} where {expected} was due")
                    yield plans[expected], EncodedRows.from_bytes(blob)
                    expected += 1
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # ends the streaming execution (and its actors) now, not when garbage-collected
        if expected != len(plans):
            raise RuntimeError(f"Ray Data returned {expected} of {len(plans)} micro-batches")

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class BackgroundIterator:
    """Iterates what ``make_source()`` returns in a thread of its own from construction on, up to ``depth`` items
    ahead of the consumer; errors reach the consumer in order. :meth:`close` stops the thread and closes the source
    (for a Ray Data iterator: stops the pipeline)."""

    def __init__(self, make_source: Callable[[], Iterator], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(make_source,), name="mmrole-ingest", daemon=True)
        self._thread.start()

    def _put(self, kind: str, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put((kind, value), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make_source: Callable[[], Iterator]) -> None:
        try:
            source = make_source()
            try:
                for item in source:
                    if not self._put("item", item):
                        return
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            self._put("done", None)
        except BaseException as e:  # handed to the consumer, who raises it
            self._put("error", e)

    def __iter__(self) -> BackgroundIterator:
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._finished = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._finished = True
        self._stop.set()
        self._thread.join(timeout=60)
