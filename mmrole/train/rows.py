"""Encoded samples as Arrow rows, and back.

An encoded sample (``SampleEncoder.encode``) holds 1-D token arrays of varying length and image arrays of
varying shape (``pixel_values`` is (patches, dim) with the patch count depending on the image size). Every array is
stored as a flattened Arrow list column plus a ``<key>__shape`` column, with a fixed schema, so

* ragged rows need no special tensor extension type and survive any batching/concatenation by Ray Data;
* an empty batch (every row of it rejected) still has the schema, so blocks stay concatenable.

``decode_table`` rebuilds the per-sample dicts (numpy views, no copies of pixel data) for ``pad_batch``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

SHAPE_SUFFIX = "__shape"
ID = "id"


def spec_from_encoded(enc: dict) -> dict[str, str]:
    """Column spec of an encoder's output: key -> ``array:<dtype>`` | ``int`` | ``str``."""
    spec: dict[str, str] = {}
    for k, v in enc.items():
        if isinstance(v, np.ndarray):
            spec[k] = f"array:{v.dtype.name}"
        elif isinstance(v, (bool, np.bool_)):
            spec[k] = "int"
        elif isinstance(v, (int, np.integer)):
            spec[k] = "int"
        elif isinstance(v, str):
            spec[k] = "str"
        else:
            raise TypeError(f"encoded key {k!r}: cannot store {type(v).__name__} in a row")
    spec.setdefault(ID, "str")
    return spec


def schema_for(spec: dict[str, str]) -> pa.Schema:
    fields = []
    for k, kind in sorted(spec.items()):
        if kind == "str":
            fields.append(pa.field(k, pa.string()))
        elif kind == "int":
            fields.append(pa.field(k, pa.int64()))
        else:
            dtype = pa.from_numpy_dtype(np.dtype(kind.split(":", 1)[1]))
            fields.append(pa.field(k, pa.large_list(dtype)))  # large_list: pixel data can exceed 2^31 values
            fields.append(pa.field(k + SHAPE_SUFFIX, pa.list_(pa.int64())))
    return pa.schema(fields)


def encode_table(encoded: Sequence[dict], spec: dict[str, str]) -> pa.Table:
    """Encoded samples -> one Arrow table with :func:`schema_for` ``(spec)`` (zero rows allowed)."""
    schema = schema_for(spec)
    cols: dict[str, Any] = {}
    for k, kind in spec.items():
        if kind in ("str", "int"):
            cols[k] = pa.array([e.get(k) for e in encoded], type=schema.field(k).type)
            continue
        dtype = np.dtype(kind.split(":", 1)[1])
        arrs = []
        for e in encoded:
            if k not in e:
                raise KeyError(f"sample {e.get(ID)!r}: encoded output lacks {k!r} (the encoder changed shape)")
            arrs.append(np.ascontiguousarray(e[k], dtype=dtype))
        flat = np.concatenate([a.reshape(-1) for a in arrs]) if arrs else np.zeros(0, dtype=dtype)
        offsets = np.zeros(len(arrs) + 1, dtype=np.int64)
        if arrs:
            np.cumsum([a.size for a in arrs], out=offsets[1:])
        cols[k] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat))
        cols[k + SHAPE_SUFFIX] = pa.array([list(a.shape) for a in arrs], type=pa.list_(pa.int64()))
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


def decode_table(table: pa.Table) -> list[dict]:
    """Arrow rows (from :func:`encode_table`, possibly re-batched) -> per-sample dicts of numpy arrays/scalars."""
    n = table.num_rows
    out: list[dict] = [{} for _ in range(n)]
    names = set(table.column_names)
    for name in table.column_names:
        if name.endswith(SHAPE_SUFFIX):
            continue
        col = table.column(name).combine_chunks()
        if (name + SHAPE_SUFFIX) in names:
            shapes = table.column(name + SHAPE_SUFFIX).to_pylist()
            values = col.flatten().to_numpy(zero_copy_only=False)  # only this slice's values
            offsets = col.offsets.to_numpy()
            base = offsets[0]
            for i in range(n):
                a, b = offsets[i] - base, offsets[i + 1] - base
                out[i][name] = values[a:b].reshape(shapes[i])
        else:
            for i, v in enumerate(col.to_pylist()):
                out[i][name] = v
    return out


def batch_token_counts(rows: Iterable[dict]) -> tuple[int, int, int]:
    """(text tokens, image tokens, supervised target tokens) of decoded rows."""
    t = i = g = 0
    for r in rows:
        t += int(r.get("num_text_tokens", 0))
        i += int(r.get("num_image_tokens", 0))
        g += int(r.get("num_target_tokens", 0))
    return t, i, g
