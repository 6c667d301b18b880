"""The layout of an eval folder, as published: ``<set>_<answers|reviews|results>/<model>/<type>_test.<json|csv>``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .formats import EvalDataError
from .metrics import DIALOGUE_TYPES, SETS

_SET_DIR = re.compile(r"^(?P<set>.+)_(?P<kind>answers|reviews|results)$")
_TYPE_FILE = re.compile(r"^(?P<type>.+)_test\.(?P<ext>json|csv)$")


@dataclass(frozen=True)
class EvalFile:
    model: str
    set_name: str
    dialogue_type: str
    path: Path


def known_first(value: str, known: Sequence[str]) -> tuple:
    """Sort key: the known values in their order, then the others by name."""
    return (known.index(value), "") if value in known else (len(known), value)


def discover(eval_dir: Union[str, Path], kind: str = "reviews", ext: str = "json") -> list[EvalFile]:
    """Files ``<set>_<kind>/<model>/<type>_test.<ext>`` under ``eval_dir``, sorted by model, set, type."""
    root = Path(eval_dir)
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a directory")
    out = []
    for set_dir in root.iterdir():
        m = _SET_DIR.match(set_dir.name)
        if not (set_dir.is_dir() and m and m["kind"] == kind):
            continue
        for model_dir in set_dir.iterdir():
            if not model_dir.is_dir():
                continue
            for f in model_dir.iterdir():
                t = _TYPE_FILE.match(f.name)
                if f.is_file() and t and t["ext"] == ext:
                    out.append(EvalFile(model_dir.name, m["set"], t["type"], f))
    out.sort(key=lambda e: (e.model, known_first(e.set_name, SETS), known_first(e.dialogue_type, DIALOGUE_TYPES)))
    return out
