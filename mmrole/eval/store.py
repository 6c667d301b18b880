"""Resumable, append-only stores: one JSON line per record; :class:`ResultsStore` holds :class:`JudgeResult` lines
keyed by (sample_id, metric) and stamped with a cache key of what produced them; the answer store of the
answering job is a plain :class:`JsonlStore`.

Why append-only JSONL: a crash can only lose or half-write the last line, which is detected and cut off on the
next append; nothing already written is rewritten. Reading dedups: for a key, the first successful result
wins (a rerun never overwrites a score), else the latest failure. ``audit`` makes "exactly once" checkable.
One writer per file (the driver); parallel writers should use one file each and :func:`load_results`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
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


class JsonlStore:
    """Append-only JSON lines, one object each: a torn (half-written) last line is ignored on read and cut off on
    the next append; any other corrupt line is an error naming the file and line. One writer per file."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def read_records(self) -> tuple[list[dict], bool]:
        """All stored objects in file order, and whether a half-written last line was ignored."""
        if not self.path.exists():
            return [], False
        lines = self.path.read_bytes().split(b"\n")
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
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError(f"a line holds {type(rec).__name__}, expected an object")
            except ValueError as e:
                raise StoreError(f"{self.path}:{i}: corrupt line ({e}): {raw[:120]!r}") from e
            out.append((i, rec))
        return out, truncated

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
            # Scan back for the last newline; records are small, so read the tail in chunks.
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

    def append_records(self, records: Iterable[dict], fsync: bool = True) -> int:
        """Append objects (one line each, flushed and fsynced); returns how many were written."""
        records = list(records)
        if not records:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        return len(records)


@dataclass
class CacheCheck:
    """How stored lines relate to the expected cache keys: matching ones are reused, the others are not."""

    n_unkeyed: int = 0  # written without a cache key (older mmrole): not reused
    n_stale: int = 0  # written by another judge/agent, template, parameters or answer text: not reused

    def warning(self, path) -> Optional[str]:
        parts = []
        if self.n_unkeyed:
            parts.append(
                f"{self.n_unkeyed} stored result(s) carry no cache key (written by an older mmrole), so what "
                "produced them is unknown: they are not reused and will be recomputed"
            )
        if self.n_stale:
            parts.append(
                f"{self.n_stale} stored result(s) were produced by a different model, template, generation "
                "parameters or input text: they are not reused"
            )
        return f"{path}: " + "; ".join(parts) if parts else None


class ResultsStore(JsonlStore):
    """An append-only JSONL file of judge results.

    With ``cache_keys`` ({(sample_id, metric): key}, from :func:`mmrole.eval.cache_keys.judgement_keys`), a
    stored result counts only when its ``cache_key`` equals the expected one: a new judge, template, generation
    parameters or answer text recompute; results without a key (older stores) are read, counted in
    :attr:`check` with a warning, and not reused.
    """

    def __init__(self, path: Union[str, Path], cache_keys: Optional[Mapping[Key, str]] = None):
        super().__init__(path)
        self.cache_keys = dict(cache_keys) if cache_keys is not None else None
        self.check = CacheCheck()

    # -- reading
    def read_lines(self) -> tuple[list[JudgeResult], bool]:
        """All stored results in file order (usable for the expected cache keys), and whether a half-written
        last line was ignored. Lines of other keys are counted in :attr:`check`."""
        records, truncated = self.read_records()
        out = []
        for i, rec in records:
            try:
                out.append(JudgeResult.from_dict(rec))
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{self.path}:{i}: corrupt result line ({e})") from e
        flags = {r.swapped for r in out}
        if len(flags) > 1:
            raise StoreError(f"{self.path}: mixes swapped and unswapped results; keep them in separate stores")
        self.check = CacheCheck()
        if self.cache_keys is None:
            return out, truncated
        usable = []
        for r in out:
            want = self.cache_keys.get(r.key)
            if want is None or r.cache_key == want:
                usable.append(r)
            elif not r.cache_key:
                self.check.n_unkeyed += 1
            else:
                self.check.n_stale += 1
        return usable, truncated

    def warning(self) -> Optional[str]:
        """What the last read found that is not reused (None if nothing)."""
        return self.check.warning(self.path)

    def load(self) -> dict[Key, JudgeResult]:
        """One result per key (deduplicated)."""
        return _dedup(self.read_lines()[0])

    def done_keys(self, retry_failed: bool = False) -> set[Key]:
        res = self.load()
        return {k for k, r in res.items() if r.ok or not retry_failed}

    def pending(self, requests: Sequence[JudgeRequest], retry_failed: bool = False) -> list[JudgeRequest]:
        """The requests still to score: no usable stored result (or, with ``retry_failed``, only a failure)."""
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
    def append(self, results: Iterable[JudgeResult], fsync: bool = True) -> int:
        """Append results (one line each, flushed and fsynced), stamping the expected cache key on each."""
        results = list(results)
        if self.cache_keys is not None:
            for r in results:
                r.cache_key = self.cache_keys.get(r.key, r.cache_key)
        return self.append_records((r.to_dict() for r in results), fsync)


def load_results(paths: Iterable[Union[str, Path]]) -> dict[Key, JudgeResult]:
    """Deduplicated results over several store files (e.g. one per worker)."""
    lines: list[JudgeResult] = []
    for p in paths:
        lines.extend(ResultsStore(p).read_lines()[0])
    return _dedup(lines)


def store_for(
    out_dir: Union[str, Path],
    model: str,
    swapped: bool = False,
    judge: Optional[str] = None,
    cache_keys: Optional[Mapping[Key, str]] = None,
) -> ResultsStore:
    """Conventional store location: ``<out_dir>/judge_results/<model>[.<judge>][.swapped].jsonl``."""
    name = model + (f".{judge}" if judge else "") + (".swapped" if swapped else "") + ".jsonl"
    return ResultsStore(Path(out_dir) / "judge_results" / name, cache_keys)
