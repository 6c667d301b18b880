"""Rows the training pipeline could not use: written one JSON line each by the encoder actors, merged per run.

Ray Data re-executes the pipeline every epoch (and again after a worker restart), so the same bad row is seen
several times; the merged ``<run_dir>/rejects.jsonl`` has one line per (id, stage) (the first reason seen: messages
may differ in details such as object addresses)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Optional

REJECTS_DIR = "rejects"
REJECTS_FILE = "rejects.jsonl"


class RejectWriter:
    """Appends reject records to a file of its own under ``rejects_dir`` (one writer per process: no locking).
    Each line is flushed at once, so a process that dies keeps what it recorded."""

    def __init__(self, rejects_dir: str | Path, prefix: str = "encode"):
        self.dir = Path(rejects_dir)
        self.name = f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._f = None
        self.count = 0

    def write(self, sample_id: str, reason: str, stage: str, **extra) -> None:
        if self._f is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._f = open(self.dir / self.name, "a", encoding="utf-8")
        rec = {"id": sample_id, "reason": reason, "stage": stage, **extra}
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        self.count += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def merge_rejects(run_dir: str | Path, out: Optional[str | Path] = None) -> list[dict]:
    """Merge ``<run_dir>/rejects/*.jsonl`` into ``<run_dir>/rejects.jsonl``, one line per (id, stage), sorted by
    id; returns the records. Unreadable lines (a process killed mid-write) are skipped."""
    run_dir = Path(run_dir)
    seen: dict[tuple[str, str], dict] = {}
    for f in sorted((run_dir / REJECTS_DIR).glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            seen.setdefault((str(r.get("id")), str(r.get("stage"))), r)
    records = [seen[k] for k in sorted(seen)]
    target = Path(out) if out else run_dir / REJECTS_FILE
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    return records


def count_by_reason(records: list[dict]) -> dict[str, int]:
    c: dict[str, int] = {}
    for r in records:
        c[r.get("stage", "?")] = c.get(r.get("stage", "?"), 0) + 1
    return c
