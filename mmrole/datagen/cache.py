"""Per-item teacher cache keyed by (stage, inputs, teacher, template): a rerun asks only what is missing or changed.

One small JSON file per successful reply under ``<cache_dir>/<stage>/<key[:2]>/<key>.json``, written atomically by
the driver; failed requests are not cached, so a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional


def item_key(stage: str, inputs: dict, teacher: str, template_digest: str) -> str:
    """A stable hash of everything that decides a teacher reply."""
    blob = json.dumps([stage, inputs, teacher, template_digest], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class TeacherCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / f"{key}.json"

    def get(self, stage: str, key: str) -> Optional[dict]:
        p = self._path(stage, key)
        try:
            value = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, stage: str, key: str, value: dict) -> None:
        p = self._path(stage, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        tmp.replace(p)
