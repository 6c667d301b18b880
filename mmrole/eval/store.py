"""Resumable, append-only results store: one JSON line per :class:`JudgeResult`, keyed by (sample_id, metric).

Why append-only JSONL: a crash can only lose or half-write the last line, which is detected and cut off on the
next append; nothing already written is rewritten. Reading dedups: for a key, the first successful result
wins (a rerun never overwrites a score), else the latest failure. ``audit`` makes "exactly once" checkable.
One writer per file (the driver); parallel writers should use one file each and :func:`load_results`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .contract import JudgeRequest, JudgeResult, Key


class StoreError(ValueError):
    """A results file that is corrupt other than a half-written last line."""


@dataclass
class StoreAudit:
    """How the stored lines relate to the expected keys."""

    n_lines: int
    n_keys: int
    n_ok: int
    n_failed: int
    missing: list[Key] = field(default_factory=list)
    unexpected: list[Key] = field(default_factory=list)
    repeated: dict[Key, int] = field(default_factory=dict)  # keys with more than one line (a re-asked failure)
    truncated_tail: bool = False

    @property
    def complete(self) -> bool:
        """Every expected key has exactly one (deduplicated) result and nothing else is there."""
        return not self.missing and not self.unexpected

    def to_dict(self) -> dict:
        return {
            "n_lines": self.n_lines,
            "n_keys": self.n_keys,
            "n_ok": self.n_ok,
            "n_failed": self.n_failed,
            "missing": [list(k) for k in self.missing],
            "unexpected": [list(k) for k in self.unexpected],
            "repeated": {f"{k[0]}|{k[1]}": v for k, v in self.repeated.items()},
            "truncated_tail": self.truncated_tail,
            "complete": self.complete,
        }


def _dedup(results: Iterable[JudgeResult]) -> dict[Key, JudgeResult]:
    out: dict[Key, JudgeResult] = {}
    for r in results:
        prev = out.get(r.key)
        if prev is None or not prev.ok:  # first ok wins; a later failure never hides a score
            out[r.key] = r
    return out


class ResultsStore:
    """An append-only JSONL file of judge results."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    # -- reading
    def read_lines(self) -> tuple[list[JudgeResult], bool]:
        """All stored results in file order, and whether a half-written last line was ignored."""
        if not self.path.exists():
            return [], False
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        truncated = False
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:  # no newline at the end: the last write was cut off
            truncated = True
            lines.pop()
        out = []
        for i, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                out.append(JudgeResult.from_dict(json.loads(raw)))
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{self.path}:{i}: corrupt result line ({e}): {raw[:120]!r}") from e
        flags = {r.swapped for r in out}
        if len(flags) > 1:
            raise StoreError(f"{self.path}: mixes swapped and unswapped results; keep them in separate stores")
        return out, truncated

    def load(self) -> dict[Key, JudgeResult]:
        """One result per key (deduplicated)."""
        return _dedup(self.read_lines()[0])

    def done_keys(self, retry_failed: bool = False) -> set[Key]:
        res = self.load()
        return {k for k, r in res.items() if r.ok or not retry_failed}

    def pending(self, requests: Sequence[JudgeRequest], retry_failed: bool = False) -> list[JudgeRequest]:
        """The requests still to score: no stored result (or, with ``retry_failed``, only a failure)."""
        done = self.done_keys(retry_failed)
        return [r for r in requests if r.key not in done]

    def audit(self, expected: Iterable[Key]) -> StoreAudit:
        lines, truncated = self.read_lines()
        counts: dict[Key, int] = {}
        for r in lines:
            counts[r.key] = counts.get(r.key, 0) + 1
        res = _dedup(lines)
        expected = list(dict.fromkeys(expected))
        exp = set(expected)
        return StoreAudit(
            n_lines=len(lines),
            n_keys=len(res),
            n_ok=sum(r.ok for r in res.values()),
            n_failed=sum(not r.ok for r in res.values()),
            missing=[k for k in expected if k not in res],
            unexpected=[k for k in res if k not in exp],
            repeated={k: c for k, c in counts.items() if c > 1},
            truncated_tail=truncated,
        )

    # -- writing
    def _repair_tail(self) -> int:
        """Cut a half-written last line (no trailing newline); returns the bytes removed."""
        if not self.path.exists():
            return 0
        size = self.path.stat().st_size
        if size == 0:
            return 0
        with open(self.path, "rb+") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            # Scan back for the last newline; results are small, so read the tail in chunks.
            pos, chunk = size, 1 << 16
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                buf = f.read(pos - start)
                nl = buf.rfind(b"\n")
                if nl >= 0:
                    cut = start + nl + 1
                    break
                pos = start
            else:
                cut = 0
            f.truncate(cut)
            return size - cut

    def append(self, results: Iterable[JudgeResult], fsync: bool = True) -> int:
        """Append results (one line each, flushed and fsynced); returns how many were written."""
        results = list(results)
        if not results:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        payload = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        return len(results)


def load_results(paths: Iterable[Union[str, Path]]) -> dict[Key, JudgeResult]:
    """Deduplicated results over several store files (e.g. one per worker)."""
    lines: list[JudgeResult] = []
    for p in paths:
        lines.extend(ResultsStore(p).read_lines()[0])
    return _dedup(lines)


def store_for(
    out_dir: Union[str, Path], model: str, swapped: bool = False, judge: Optional[str] = None
) -> ResultsStore:
    """Conventional store location: ``<out_dir>/judge_results/<model>[.<judge>][.swapped].jsonl``."""
    name = model + (f".{judge}" if judge else "") + (".swapped" if swapped else "") + ".jsonl"
    return ResultsStore(Path(out_dir) / "judge_results" / name)
