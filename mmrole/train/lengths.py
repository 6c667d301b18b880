"""Token lengths of a prepared split for a given model: the distribution (text and image tokens, percentiles) and
how many rows a ``max_length`` keeps, with the same encoder the training ingest uses (no Ray, no weights).

``mmrole data lengths PREPARED --model PATH`` prints it; a training job can call :func:`measure_lengths` on the
first rows at start and print :func:`format_length_report` before encoding the whole dataset.

A row's encoded length depends on ``max_length`` only through the history-first truncation policy of
:class:`mmrole.models.encoding.SampleEncoder`: a row whose full prompt is too long is kept with its oldest history
lines dropped, and rejected only if even the prompt without history (``shortest``) does not fit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

UNLIMITED = 10**9  # max_length of the measuring encoder: nothing is cut
PERCENTILES = (50, 90, 95, 99)
DEFAULT_MAX_LENGTHS = (1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class RowLength:
    id: str
    total: int  # tokens with the whole history (image tokens included)
    text: int
    image: int
    target: int  # supervised tokens (answer + end marker)
    shortest: int  # tokens with all history dropped: the least the encoder can make of this row


@dataclass
class LengthReport:
    prepared: str
    split: str
    model: str
    rows_in: int = 0
    rows: list[RowLength] = field(default_factory=list)
    not_measured: Counter = field(default_factory=Counter)  # reason kind -> rows (bad image, empty target, ...)
    not_measured_examples: list[tuple[str, str]] = field(default_factory=list)  # (id, reason), the first few

    def column(self, name: str) -> np.ndarray:
        return np.asarray([getattr(r, name) for r in self.rows], dtype=np.int64)

    def distribution(self, name: str) -> dict[str, float]:
        """mean, min, p50/p90/p95/p99, max of one per-row figure."""
        v = self.column(name)
        if not len(v):
            return {}
        out = {"mean": float(v.mean()), "min": int(v.min())}
        out |= {f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}
        out["max"] = int(v.max())
        return out

    def keeps(self, max_length: int) -> dict:
        """What training with ``max_length`` makes of the measured rows: kept whole, kept with history shortened,
        rejected as too long (with the first ids)."""
        whole = [r for r in self.rows if r.total <= max_length]
        short = [r for r in self.rows if r.shortest <= max_length < r.total]
        too_long = [r for r in self.rows if r.shortest > max_length]
        return {
            "max_length": int(max_length),
            "kept": len(whole) + len(short),
            "kept_whole": len(whole),
            "kept_history_shortened": len(short),
            "rejected_too_long": len(too_long),
            "rejected_examples": [r.id for r in too_long[:5]],
            "kept_frac": (len(whole) + len(short)) / max(len(self.rows), 1),
        }

    def to_json(self, max_lengths: Sequence[int] = DEFAULT_MAX_LENGTHS) -> dict:
        return {
            "prepared": self.prepared,
            "split": self.split,
            "model": self.model,
            "rows_in": self.rows_in,
            "rows_measured": len(self.rows),
            "not_measured": dict(self.not_measured),
            "not_measured_examples": [list(x) for x in self.not_measured_examples],
            "tokens": {k: self.distribution(k) for k in ("total", "text", "image", "target", "shortest")},
            "max_length": [self.keeps(n) for n in max_lengths],
        }


def measure_lengths(
    prepared: str | Path,
    model,
    split: str = "train",
    limit: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> LengthReport:
    """Encode the rows of ``split`` (the first ``limit`` ones) with the processor of ``model`` (a model path or a
    :class:`mmrole.models.config.VLMConfig`; its pixel budget applies) and record each row's token counts.

    Rows that cannot be encoded at any length (missing image, empty target, control tokens) are counted by
    reason, with the first ids, never silently left out."""
    import dataclasses

    import pyarrow.parquet as pq

    from mmrole.data.images import ImageError, load_image
    from mmrole.data.prepared import images_root, split_files
    from mmrole.data.records import Sample
    from mmrole.models.config import VLMConfig
    from mmrole.models.encoding import SampleEncoder, SampleRejected, SampleTooLong, build_encoder

    cfg = model if isinstance(model, VLMConfig) else VLMConfig(model_path=str(model))
    full = build_encoder(dataclasses.replace(cfg, max_length=UNLIMITED))
    # max_length 0: every encode raises SampleTooLong carrying the length of the row without its history.
    bare = SampleEncoder(full.processor, full.family, 0, full.chat_template)
    files = split_files(prepared, split)
    if not files:
        from mmrole.data.prepared import PreparedDataError

        raise PreparedDataError(f"{prepared}: no split {split!r} in the manifest")
    root = images_root(prepared)
    rep = LengthReport(str(prepared), split, cfg.model_path)

    def reject(sid: str, kind: str, reason: str) -> None:
        rep.not_measured[kind] += 1
        if len(rep.not_measured_examples) < 5:
            rep.not_measured_examples.append((sid, reason))

    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                if limit is not None and rep.rows_in >= limit:
                    return rep
                rep.rows_in += 1
                sid = str(row.get("id"))
                try:
                    image = load_image(root, row["image"], data=row.get("image_bytes")) if row.get("image") else None
                    sample = Sample.from_row(row)
                    enc = full.encode(sample, image)
                except ImageError as e:
                    reject(sid, "image", str(e))
                    continue
                except SampleRejected as e:
                    reject(sid, "encode", e.reason)
                    continue
                total = len(enc["input_ids"])
                shortest = total
                if sample.history_lines:
                    try:
                        bare.encode(sample, image)
                    except SampleTooLong as e:
                        shortest = min(total, e.length)
                rep.rows.append(
                    RowLength(
                        sid,
                        total,
                        enc["num_text_tokens"],
                        enc["num_image_tokens"],
                        enc["num_target_tokens"],
                        shortest,
                    )
                )
                if progress is not None and rep.rows_in % 1000 == 0:
                    progress(f"{rep.rows_in} rows measured")
    return rep


def format_length_report(rep: LengthReport, max_lengths: Sequence[int] = DEFAULT_MAX_LENGTHS) -> str:
    """The report as a few lines of text: counts, a percentile table, then one line per ``max_length``."""
    lines = [
        f"{rep.prepared} split {rep.split}, model {rep.model}",
        f"rows: {rep.rows_in} in, {len(rep.rows)} measured, {sum(rep.not_measured.values())} not encodable"
        + (f" {dict(rep.not_measured)}" if rep.not_measured else ""),
    ]
    for sid, reason in rep.not_measured_examples:
        lines.append(f"  not encodable: {sid}: {reason}")
    if rep.rows:
        cols = ["mean", "min"] + [f"p{p}" for p in PERCENTILES] + ["max"]
        label = {
            "total": "total (full history)",
            "text": "text",
            "image": "image",
            "target": "target (supervised)",
            "shortest": "total (history dropped)",
        }
        w = max(len(v) for v in label.values())
        lines.append("tokens per row".ljust(w) + "".join(c.rjust(9) for c in cols))
        for key, name in label.items():
            d = rep.distribution(key)
            lines.append(name.ljust(w) + "".join(f"{d[c]:9.0f}" for c in cols))
    for n in max_lengths:
        k = rep.keeps(n)
        ex = f" (e.g. {', '.join(k['rejected_examples'])})" if k["rejected_examples"] else ""
        lines.append(
            f"max_length {n}: keeps {k['kept']}/{len(rep.rows)} ({100 * k['kept_frac']:.1f}%: "
            f"{k['kept_whole']} whole, {k['kept_history_shortened']} with history shortened), "
            f"rejects {k['rejected_too_long']} as too long{ex}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- padding waste


def padded_tokens(lengths: Sequence[int], micro_batch: int) -> int:
    """Tokens computed when consecutive rows form micro-batches of ``micro_batch`` padded to their longest row."""
    total = 0
    for i in range(0, len(lengths), micro_batch):
        chunk = lengths[i : i + micro_batch]
        total += len(chunk) * max(chunk)
    return total


def packed_tokens(lengths: Sequence[int], max_length: int, buffer: Optional[int] = None) -> tuple[int, int]:
    """(tokens computed, packs) when rows are packed first-fit-decreasing into rows of ``max_length`` tokens, each
    pack computed at its full ``max_length`` (fixed-size micro-batches: the worst case; varlen attention computes
    only the real tokens). ``buffer``: plan packs over windows of that many consecutive rows, as a streaming loader
    does (None: the whole list at once). Rows longer than ``max_length`` must be filtered out first."""
    from mmrole.models.batching import plan_packs

    if any(n > max_length for n in lengths):
        raise ValueError(f"packed_tokens: rows longer than max_length {max_length}; filter them first")
    step = buffer or max(len(lengths), 1)
    packs = 0
    for i in range(0, len(lengths), step):
        packs += len(plan_packs(list(lengths[i : i + step]), max_length))
    return packs * max_length, packs
