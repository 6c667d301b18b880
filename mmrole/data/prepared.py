"""Reading the output of ``mmrole data prepare`` (see docs/prepared-format.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import pyarrow as pa
import pyarrow.parquet as pq

from .records import Sample

FORMAT = "mmrole-prepared/1"
MANIFEST = "manifest.json"


class PreparedDataError(ValueError):
    """A prepared-data folder that is missing, incomplete or from another format version."""


def sample_schema(embed_images: bool = False) -> pa.Schema:
    """The Parquet schema of prepared samples."""
    fields = [
        ("id", pa.string()),
        ("system", pa.string()),
        ("user_text", pa.string()),
        ("image", pa.string()),
        ("target", pa.string()),
        ("role", pa.string()),
        ("other_role", pa.string()),
        ("script", pa.string()),
        ("dialogue_type", pa.string()),
        ("k", pa.int64()),
        ("group", pa.string()),
        ("prompt_head", pa.string()),
        ("history_header", pa.string()),
        ("history_lines", pa.list_(pa.string())),
        ("history_footer", pa.string()),
        ("prompt_tail", pa.string()),
    ]
    if embed_images:
        fields.append(("image_bytes", pa.binary()))
    return pa.schema(fields)


def load_manifest(out_dir: Union[str, Path]) -> dict:
    """The manifest of a prepared folder; raises PreparedDataError naming the path."""
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        raise PreparedDataError(f"{p}: no manifest; run `mmrole data prepare ROOT {out_dir}` first")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PreparedDataError(f"{p}: corrupt manifest ({e})") from e
    if m.get("format") != FORMAT:
        raise PreparedDataError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def split_files(out_dir: Union[str, Path], split: str) -> list[Path]:
    """Absolute paths of a split's Parquet shards (empty list for a split that was not written)."""
    m = load_manifest(out_dir)
    info = m["splits"].get(split)
    return [Path(out_dir) / f for f in info["files"]] if info else []


def images_root(out_dir: Union[str, Path]) -> Path:
    return Path(load_manifest(out_dir)["images_root"])


def iter_samples(out_dir: Union[str, Path], split: str) -> Iterator[Sample]:
    """Stream a split's samples back as Sample records (image bytes are not included)."""
    for f in split_files(out_dir, split):
        pf = pq.ParquetFile(f)
        cols = [c for c in pf.schema_arrow.names if c != "image_bytes"]
        for batch in pf.iter_batches(columns=cols, batch_size=2048):
            for row in batch.to_pylist():
                yield Sample.from_row(row)
