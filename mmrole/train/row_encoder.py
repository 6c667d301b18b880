"""Rows of a prepared split, read by index and encoded for training (pure: no Ray, no DeepSpeed).

:class:`SplitRows` holds a split's Parquet rows (the first ``max_rows`` in manifest order, so ``data.max_rows``
selects the same rows every epoch) and hands out rows by index. :class:`RowEncoder` turns a list of indices into
encoded samples *in that order*; a row whose image cannot be decoded or that does not fit ``max_length`` is written
to the run's rejects (id, stage, reason) and left out, never raised. The same class runs in the train worker
(``data.encode_actors: 0``) or in CPU actors that the worker drives (:mod:`mmrole.ray_data_ingest`): either way
results are consumed in submission order, so timing cannot reorder rows.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from mmrole.train.rejects import RejectWriter


class SplitRows:
    """A prepared split's rows (the first ``max_rows``), addressable by index."""

    def __init__(self, prepared: str, split: str, max_rows: Optional[int] = None):
        from mmrole.data.prepared import load_manifest, split_files

        manifest = load_manifest(prepared)
        files = split_files(prepared, split)
        if not files:
            raise FileNotFoundError(
                f"{prepared}: the prepared data has no {split!r} split (splits: {sorted(manifest.get('splits', {}))})"
            )
        tables = []
        n = 0
        for f in files:
            if max_rows is not None and n >= max_rows:
                break
            if not f.is_file():
                raise FileNotFoundError(f"{prepared}: shard listed in manifest.json is missing: {f}")
            t = pq.read_table(f, memory_map=True)
            tables.append(t)
            n += t.num_rows
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        self.table = table.slice(0, max_rows) if max_rows is not None else table
        self.images_root = str(manifest["images_root"])
        self.split = split

    @property
    def n_rows(self) -> int:
        return self.table.num_rows

    def take(self, indices: Sequence[int]) -> list[dict]:
        return self.table.take(pa.array(list(indices), type=pa.int64())).to_pylist()


@dataclass
class EncodedRows:
    """Encoded samples of one request, in request order, and what was rejected (id, stage, reason, length)."""

    samples: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        """An Arrow IPC stream: the samples as :func:`mmrole.train.rows.encode_table` rows, the rejects as JSON in
        the schema metadata. What the training ingest's Ray Data column carries (no pickle)."""
        from mmrole.train.rows import ID, encode_table, spec_from_encoded

        spec = spec_from_encoded(self.samples[0]) if self.samples else {ID: "str"}
        table = encode_table(self.samples, spec).replace_schema_metadata({_REJECTED: json.dumps(self.rejected)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> EncodedRows:
        """The inverse of :meth:`to_bytes` (arrays are views of ``blob``'s buffer, not copies)."""
        from mmrole.train.rows import decode_table

        table = pa.ipc.open_stream(blob).read_all()
        return cls(decode_table(table), json.loads(table.schema.metadata[_REJECTED.encode()]))


_REJECTED = "mmrole.rejected"  # schema metadata key of EncodedRows.to_bytes


class RowEncoder:
    """Index -> encoded sample for one prepared split and one model's processor (no weights)."""

    def __init__(
        self,
        model: dict,
        prepared: str,
        split: str,
        max_rows: Optional[int] = None,
        rejects_dir: Optional[str] = None,
        with_target: bool = True,
        pairs: bool = False,
    ):
        from mmrole.models.config import VLMConfig
        from mmrole.models.encoding import build_encoder

        self.rows = SplitRows(prepared, split, max_rows)
        self.encoder = build_encoder(VLMConfig.from_dict(model))
        self.with_target = with_target
        # Preference rows (DPO): each row gives two samples, its ``target`` (chosen) then its ``rejected`` reply.
        self.pairs = pairs
        self.rejects = RejectWriter(rejects_dir, prefix=f"encode-{split}") if rejects_dir else None

    def encode_rows(self, indices: Sequence[int]) -> EncodedRows:
        from mmrole.data.images import ImageError, load_image
        from mmrole.data.records import Sample
        from mmrole.models.encoding import SampleRejected, SampleTooLong

        out = EncodedRows()
        for row in self.rows.take(indices):
            sid = str(row.get("id"))
            stage, reason, length = None, "", None
            try:
                image = load_image(self.rows.images_root, row["image"], data=row.get("image_bytes"))
                if self.pairs:
                    out.samples.extend(encode_pair(self.encoder, row, image))
                else:
                    out.samples.append(self.encoder.encode(Sample.from_row(row), image, with_target=self.with_target))
                continue
            except ImageError as e:
                stage, reason = "image", str(e)
            except SampleTooLong as e:
                stage, reason, length = "too_long", e.reason, e.length
            except SampleRejected as e:
                stage, reason = "encode", e.reason
            rec = {"id": sid, "stage": stage, "reason": reason, "length": length}
            out.rejected.append(rec)
            if self.rejects is not None:
                self.rejects.write(sid, reason, stage, image=row.get("image"), split=self.rows.split)
        return out


REJECTED_SUFFIX = "::rejected"  # id of a preference row's rejected sample: <row id>::rejected


def encode_pair(encoder: Any, row: dict, image: Any) -> list[dict]:
    """A preference row -> [chosen, rejected] encoded samples with the *same* prompt: when one reply is long enough
    to make the encoder drop history lines, both are encoded with the history both can keep. Either reply not
    fitting rejects the row (raised)."""
    import dataclasses

    from mmrole.data.records import Sample
    from mmrole.models.encoding import SampleRejected

    if "rejected" not in row:
        raise SampleRejected(str(row.get("id")), "not a preference row (no 'rejected' column)")
    chosen = Sample.from_row(row)
    rejected = dataclasses.replace(chosen, id=chosen.id + REJECTED_SUFFIX, target=row["rejected"] or "")
    enc = [encoder.encode(s, image, with_target=True) for s in (chosen, rejected)]
    kept = min(e["history_kept"] for e in enc)
    if any(e["history_kept"] != kept for e in enc):
        lines = chosen.history_lines[len(chosen.history_lines) - kept :] if kept > 0 else []
        enc = [encoder.encode(dataclasses.replace(s, history_lines=lines), image) for s in (chosen, rejected)]
        for e in enc:  # counted against the full history, as for every sample
            e["history_dropped"] = len(chosen.history_lines) - kept
    return enc


def filler_sample(encoder: Any, with_target: bool = True) -> dict:
    """A synthetic encoded sample for a micro-batch whose rows were all rejected: every rank must still run a
    forward/backward (collectives), and its loss is multiplied by 0."""
    from PIL import Image

    from mmrole.data.records import Sample

    probe = Sample(
        id="__filler__",
        system="filler",
        user_text="filler",
        image="filler.png",
        target="filler",
        role="r",
        other_role="o",
        script="s",
        dialogue_type="comment",
        k=1,
    )
    return encoder.encode(probe, Image.new("RGB", (64, 64)), with_target=with_target)


def ordered_prefetch(
    requests: Iterable[Any], submit: Callable[[Any], Any], get: Callable[[Any], Any], depth: int
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(request, result)`` in request order, keeping up to ``depth`` submitted ahead (``submit`` returns a
    handle, e.g. a future or an ObjectRef; ``get`` waits for it). Order never depends on which finishes first."""
    pending: deque = deque()
    it = iter(requests)
    for req in it:
        pending.append((req, submit(req)))
        if len(pending) >= max(depth, 1):
            break
    while pending:
        req, handle = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, submit(nxt)))
        yield req, get(handle)
