"""``mmrole data prepare``: render training samples and read the test split into Parquet shards.

Streams dialogue files and writes shards as it goes, so memory stays flat whatever the dataset size.
Output is deterministic (same input -> byte-identical shards) and written into a temporary folder that
replaces the previous output only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from .images import ImageError, resolve_image_path
from .prepared import FORMAT, MANIFEST, sample_schema
from .reader import MMRoleDataset, load_dataset
from .records import Sample
from .render import RenderStats, expand_dialogue
from .templates import load_roleplay_template


@dataclass
class PrepareConfig:
    shard_rows: int = 20_000
    embed_images: bool = False
    # Samples whose image file is absent are rejected; COCO images are downloaded separately by users.
    require_images: bool = True
    # Drop from training every dialogue that the published test split samples from (no leakage).
    hold_out_test_dialogues: bool = True
    template: Optional[str] = None
    row_group_rows: int = 2_000
    # "template": the test questions are re-rendered from their dialogues with the training template (one
    # wording for training and test; ids unchanged); "published": the published test questions as they are.
    test_wording: str = "template"
    # "dialogues": render training samples from the dialogues; "published": the published data/train/*.json
    # (rendered, with <img> tags) as they are, keeping the published wording for training and test.
    train_source: str = "dialogues"

    def __post_init__(self):
        if self.test_wording not in ("template", "published"):
            raise ValueError(f"test_wording: {self.test_wording!r} is not 'template' or 'published'")
        if self.train_source not in ("dialogues", "published"):
            raise ValueError(f"train_source: {self.train_source!r} is not 'dialogues' or 'published'")


@dataclass
class SplitWriter:
    """Writes one split as numbered Parquet shards."""

    out: Path
    split: str
    schema: pa.Schema
    shard_rows: int
    row_group_rows: int
    files: list = field(default_factory=list)
    rows: int = 0
    _buf: list = field(default_factory=list)
    _writer: Optional[pq.ParquetWriter] = None
    _in_shard: int = 0

    def add(self, row: dict) -> None:
        self._buf.append(row)
        if len(self._buf) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        while self._buf:
            if self._writer is None:
                rel = f"{self.split}/part-{len(self.files):05d}.parquet"
                (self.out / self.split).mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self.out / rel, self.schema, compression="zstd")
                self.files.append(rel)
                self._in_shard = 0
            take = min(len(self._buf), self.shard_rows - self._in_shard)
            chunk, self._buf = self._buf[:take], self._buf[take:]
            self._writer.write_table(pa.Table.from_pylist(chunk, schema=self.schema))
            self._in_shard += take
            self.rows += take
            if self._in_shard >= self.shard_rows:
                self._writer.close()
                self._writer = None

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ImageGate:
    """Checks (and optionally reads) sample images once per path; rejections carry the reason."""

    def __init__(self, root: Path, cfg: PrepareConfig):
        self.root, self.cfg, self._cache = root, cfg, {}

    def check(self, rel: str) -> tuple[Optional[str], Optional[bytes]]:
        if rel in self._cache and not self.cfg.embed_images:
            return self._cache[rel], None
        try:
            path = resolve_image_path(self.root, rel)
            if self.cfg.require_images or self.cfg.embed_images:
                if not path.is_file():
                    raise ImageError(f"image not found: {path}")
            data = path.read_bytes() if self.cfg.embed_images else None
            self._cache[rel] = None
            return None, data
        except ImageError as e:
            self._cache[rel] = str(e)
            return str(e), None


def prepare(root: Union[str, Path], out: Union[str, Path], cfg: Optional[PrepareConfig] = None, progress=None) -> dict:
    """Render ``root`` into Parquet under ``out``; returns the manifest (also written to out/manifest.json)."""
    cfg = cfg or PrepareConfig()
    ds = load_dataset(root)
    template = load_roleplay_template(cfg.template)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _prepare_into(ds, tmp, cfg, template, progress)
        manifest["output"] = str(out.resolve())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_split(writer: SplitWriter, samples: Iterable[Sample], gate: _ImageGate, rejects: list, counts: dict) -> None:
    for s in samples:
        counts["in"] += 1
        err, data = gate.check(s.image)
        if err:
            counts["rejected"] += 1
            counts["rejected_by_reason"]["image"] = counts["rejected_by_reason"].get("image", 0) + 1
            rejects.append({"split": writer.split, "file": "", "id": s.id, "code": "image", "reason": err})
            continue
        row = s.to_row()
        if gate.cfg.embed_images:
            row["image_bytes"] = data
        writer.add(row)
        counts["out"] += 1
    writer.close()


def _prepare_into(ds: MMRoleDataset, out: Path, cfg: PrepareConfig, template, progress) -> dict:
    schema = sample_schema(cfg.embed_images)
    gate = _ImageGate(ds.images_root, cfg)
    rejects: list = []
    splits: dict = {}

    def new_writer(name: str) -> SplitWriter:
        return SplitWriter(out, name, schema, cfg.shard_rows, cfg.row_group_rows)

    # Test split first: its dialogue ids are held out of training.
    test_samples = list(ds.iter_test_samples())
    test_dialogues = {s.id.rsplit("_", 1)[0] for s in test_samples}
    held_out = test_dialogues if cfg.hold_out_test_dialogues else set()
    stats = RenderStats()
    held = {"dialogues": 0}
    stash: dict = {}  # the test samples' dialogues, to re-render their questions with the training template

    def train_samples() -> Iterator[Sample]:
        for d in ds.iter_dialogues():
            if d.id in test_dialogues:
                stash[d.id] = d
            if d.id in held_out:
                held["dialogues"] += 1
                continue
            yield from expand_dialogue(d, ds.characters, template, stats)
            if progress and stats.dialogues_in % 1000 == 0:
                progress(f"rendered {stats.dialogues_in} dialogues, {stats.samples_out} samples")

    def published_train() -> Iterator[Sample]:
        files = sorted((ds.root / "data" / "train").glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{ds.root / 'data' / 'train'}: no published training file (*.json)")
        for f in files:
            yield from ds.iter_conversation_file(f, "published")

    wording = {"train": f"template {template.source}", "test": "published"}
    test_wording = {"rerendered": 0, "differs_from_published": 0, "kept_published": 0, "kept_by_reason": {}}

    def test_in_training_wording() -> Iterator[Sample]:
        for s in test_samples:
            d = stash.get(s.id.rsplit("_", 1)[0])
            new = None
            if d is None:
                why = "dialogue_not_found"
            else:
                new = next((x for x in expand_dialogue(d, ds.characters, template) if x.id == s.id), None)
                why = "turn_not_rendered"
            if new is None:  # counted and reported: this sample keeps the published question
                test_wording["kept_published"] += 1
                test_wording["kept_by_reason"][why] = test_wording["kept_by_reason"].get(why, 0) + 1
                yield s
                continue
            new.group = s.group
            test_wording["rerendered"] += 1
            test_wording["differs_from_published"] += int((new.system, new.user_text) != (s.system, s.user_text))
            yield new

    if cfg.train_source == "published":
        train_iter, test_iter = published_train(), test_samples
        wording["train"] = "published data/train"
    elif cfg.test_wording == "template":
        train_iter, test_iter = train_samples(), None  # the test split follows the training pass (stash)
        wording["test"] = f"template {template.source}"
    else:
        train_iter, test_iter = train_samples(), test_samples

    per_split = {}
    for name in ("train", "test"):
        samples = (
            train_iter if name == "train" else (test_iter if test_iter is not None else test_in_training_wording())
        )
        counts = {"in": 0, "out": 0, "rejected": 0, "rejected_by_reason": {}}
        w = new_writer(name)
        _write_split(w, samples, gate, rejects, counts)
        splits[name] = {"files": w.files, "rows": w.rows}
        per_split[name] = counts
    for rm in ("train", "test"):
        files = sorted((ds.root / "RM_data" / rm).glob("*.json"))
        if not files:
            continue
        name = f"rm_{rm}"
        counts = {"in": 0, "out": 0, "rejected": 0, "rejected_by_reason": {}}
        w = new_writer(name)
        gen = (s for f in files for s in ds.iter_conversation_file(f, "judge"))
        _write_split(w, gen, gate, rejects, counts)
        splits[name] = {"files": w.files, "rows": w.rows}
        per_split[name] = counts
    for r in stats.rejects:
        rejects.append({"split": "train", **r})
    for p in ds.problems:
        if p.level == "error":
            rejects.append({"split": "", "file": p.file, "id": p.id, "code": p.code, "reason": p.message})
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for info in splits.values():
        info["sha256"] = {rel: _sha256(out / rel) for rel in info["files"]}
    return {
        "format": FORMAT,
        "dataset_root": str(ds.root.resolve()),
        "images_root": str(ds.images_root.resolve()),
        "embed_images": cfg.embed_images,
        "template": template.source,
        "wording": {**wording, "test_rerendering": test_wording if wording["test"] != "published" else None},
        "splits": splits,
        "counts": per_split,
        "render": {
            "dialogues_in": stats.dialogues_in + held["dialogues"],
            "dialogues_held_out_for_test": held["dialogues"],
            "dialogues_rendered": stats.dialogues_out,
            "dialogues_rejected": stats.dialogues_rejected,
            "turns_rejected": stats.turns_rejected,
            "samples_rendered": stats.samples_out,
            "rejected_by_reason": stats.rejected_by_reason,
        },
        "problems": {
            "errors": sum(p.level == "error" for p in ds.problems),
            "warnings": sum(p.level == "warning" for p in ds.problems),
        },
    }
