"""Ray Data ingest for training: prepared Parquet shards -> decoded, encoded rows that stream to the train workers.

read_parquet (shard order shuffled, reseeded every epoch) -> map_batches(EncodeRows, actor pool on CPUs)
-> streaming_split to the train workers (each shuffles rows locally with a per-epoch seed)

* Image decoding and the processor run in the CPU actor pool; train workers only pad and move tensors.
* A row whose image cannot be decoded, or that does not fit ``max_length``, is written to the run's rejects
  (id + reason) by the actor and left out; it never raises, and no block is dropped: ``max_errored_blocks`` stays
  0, so any *other* error (a bug) fails the run loudly.
* Rows leave the actors in the fixed Arrow layout of :mod:`mmrole.train.rows` (ragged arrays flattened + shapes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mmrole.train.rejects import RejectWriter
from mmrole.train.rows import encode_table, spec_from_encoded


def _processor_paths(model: dict) -> tuple[str, str]:
    """(processor dir, base model dir): an adapter dir without config.json trains on top of its base model."""
    path = Path(model["model_path"])
    base = str(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or base
    proc = str(path) if (path / "tokenizer_config.json").is_file() else base
    return proc, base


class EncodeRows:
    """Ray Data actor: Parquet sample rows -> encoded rows (``with_target``: prompt + supervised answer).

    Holds only the processor (no weights). Per-row problems become rejects; the output always has the same
    schema, even when every row of a batch is rejected."""

    def __init__(self, model: dict, images_root: str, rejects_dir: str, split: str, with_target: bool = True):
        from PIL import Image

        from mmrole.data.records import Sample
        from mmrole.models.config import VLMConfig
        from mmrole.models.encoding import SampleEncoder
        from mmrole.models.processor import build_processor, resolve_family

        cfg = VLMConfig.from_dict(model)
        proc_path, base = _processor_paths(model)
        family = resolve_family(base, cfg.family, cfg.trust_remote_code)
        processor = build_processor(proc_path, family, cfg.min_pixels, cfg.max_pixels, cfg.trust_remote_code)
        self.encoder = SampleEncoder(processor, family, cfg.max_length)
        self.images_root = images_root
        self.split = split
        self.with_target = with_target
        self.rejects = RejectWriter(rejects_dir, prefix=f"encode-{split}")
        # Learn the output columns from a synthetic sample so that empty batches carry the same schema.
        probe = Sample(
            id="__probe__",
            system="probe",
            user_text="probe",
            image="probe.png",
            target="probe",
            role="r",
            other_role="o",
            script="s",
            dialogue_type="comment",
            k=1,
        )
        self.spec = spec_from_encoded(self.encoder.encode(probe, Image.new("RGB", (64, 64)), with_target=with_target))
        self.encoder.stats = type(self.encoder.stats)()  # the probe is not a real sample

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mmrole.data.images import ImageError, load_image
        from mmrole.data.records import Sample
        from mmrole.models.encoding import SampleRejected, SampleTooLong

        good = []
        for row in batch.to_pylist():
            sid = str(row.get("id"))
            try:
                image = load_image(self.images_root, row["image"], data=row.get("image_bytes"))
            except ImageError as e:
                self.rejects.write(sid, str(e), "image", image=row.get("image"), split=self.split)
                continue
            try:
                good.append(self.encoder.encode(Sample.from_row(row), image, with_target=self.with_target))
            except SampleTooLong as e:
                self.rejects.write(sid, e.reason, "too_long", image=row.get("image"), split=self.split)
            except SampleRejected as e:
                self.rejects.write(sid, e.reason, "encode", image=row.get("image"), split=self.split)
        return encode_table(good, self.spec)


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


def configure_data_context(progress_bars: Optional[bool] = None) -> None:
    """Ray Data settings for training: never drop errored blocks (they would silently lose rows)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = 0
    if progress_bars is not None:
        ctx.enable_progress_bars = progress_bars


def build_dataset(
    source: IngestSource,
    model: dict,
    rejects_dir: str,
    *,
    max_rows: Optional[int] = None,
    shuffle_seed: Optional[int] = 0,
    encode_batch_size: int = 16,
    encode_concurrency: tuple[int, ...] = (1, 4),
    encode_num_cpus: float = 1.0,
    with_target: bool = True,
) -> ray.data.Dataset:
    """The streaming dataset of encoded training rows (lazy; executes once per epoch when iterated)."""
    from ray.data import ActorPoolStrategy, FileShuffleConfig

    configure_data_context()
    # Shuffle that streams: a different, reproducible shard order every epoch (reseeded per execution), then rows
    # are shuffled per epoch on each worker (local shuffle buffer). An all-to-all shuffle (random_shuffle or
    # randomize_block_order) would have to read the whole split before the first row reaches a worker.
    shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(source.files, shuffle=shuffle)
    if max_rows is not None:
        ds = ds.limit(max_rows)
    lo, hi = (encode_concurrency[0], encode_concurrency[-1])
    compute = ActorPoolStrategy(size=lo) if lo == hi else ActorPoolStrategy(min_size=lo, max_size=hi)
    return ds.map_batches(
        EncodeRows,
        fn_constructor_kwargs=dict(
            model=model,
            images_root=source.images_root,
            rejects_dir=str(rejects_dir),
            split=source.split,
            with_target=with_target,
        ),
        batch_size=encode_batch_size,
        batch_format="pyarrow",
        compute=compute,
        num_cpus=encode_num_cpus,
    )
