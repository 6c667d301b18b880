"""Checkpoint commit and rotation rules (pure filesystem logic, no torch/DeepSpeed/Ray).

Layout of a run directory::

    <run_dir>/checkpoints/.tmp-step_00000040-<token>/   being written (all ranks write here)
    <run_dir>/checkpoints/step_00000040/                committed: renamed from .tmp-* after COMPLETE.json
    <run_dir>/checkpoints/step_00000040.r1/             the same step committed again (a step redone after a crash)
        COMPLETE.json        commit marker: step + every file with its size and sha256 (written last, fsynced)
        trainer_state.json   step, epoch, rows consumed in the epoch, world size, ... (what resume needs)
        hf/                  Hugging Face model (safetensors; the adapter only for LoRA) + processor files
        deepspeed/           DeepSpeed engine state (module, optimizer partitions, LR scheduler) for exact resume

Guarantees (tested by SIGKILL at every filesystem operation of a save, :mod:`tests.test_checkpoint_crash`):

* Only a directory named ``step_*`` that holds a valid COMPLETE.json counts, and such a name only ever appears by
  an atomic rename of a folder whose files and marker were fsynced first: a crash leaves either the previous
  committed checkpoints untouched or a ``.tmp-*`` directory that the next run deletes.
* A step committed again goes to a new revision (``step_N.rK``); the older revision is removed only after the new
  one is in place, so there is never a moment without a complete copy of the newest step.
* Rotation renames a directory to ``.trash-*`` before deleting it, so a half-deleted checkpoint never looks
  committed; the newest complete checkpoint is never deleted (``num_to_keep: 1`` included).
* Resume verifies the sha256 of every file; a damaged checkpoint is skipped with a message naming the file, and
  the previous complete one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"
STATE = "trainer_state.json"
HF_DIR = "hf"
DS_DIR = "deepspeed"
DS_TAG = "state"  # DeepSpeed checkpoint tag (subfolder of deepspeed/)
_STEP_RE = re.compile(r"^step_(\d{8,})(?:\.r(\d+))?$")
_TMP_RE = re.compile(r"^\.tmp-step_(\d{8,})-[A-Za-z0-9_.-]+$")
_TRASH_RE = re.compile(r"^\.trash-")
_HASH_CHUNK = 8 * 1024 * 1024

log = logging.getLogger("mmrole.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint directory that is not usable; the message names it."""


def step_dir_name(step: int, revision: int = 0) -> str:
    """``step_NNNNNNNN`` (revision 0) or ``step_NNNNNNNN.rK`` (the step committed again, K-th time)."""
    return f"step_{step:08d}" + (f".r{revision}" if revision else "")


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tmp_dir(run_dir: str | Path, step: int, token: str) -> Path:
    """Where all ranks write the checkpoint of ``step`` before it is committed (``token`` = unique per attempt)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", token):
        raise ValueError(f"checkpoint token {token!r} must be a plain name")
    return checkpoints_root(run_dir) / f".tmp-{step_dir_name(step)}-{token}"


@dataclass(frozen=True)
class CheckpointEntry:
    path: Path
    step: int
    complete: bool  # committed: step_* name with a valid marker
    partial: bool  # .tmp-*/.trash-* leftovers or a step_* dir without a marker
    revision: int = 0  # K of step_N.rK (0 for step_N)

    @property
    def name(self) -> str:
        return self.path.name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. some network mounts) refuse directory fsync
        pass
    finally:
        os.close(fd)


def _write_json_durable(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def list_files(root: Path) -> dict[str, int]:
    """Every regular file under ``root`` (relative POSIX path -> size), the marker excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            out[p.relative_to(root).as_posix()] = p.stat().st_size
    return out


def file_sha256(path: str | Path, fsync: bool = False) -> str:
    """Hex sha256 of a file; with ``fsync`` the file's data is also forced to disk (the ranks that wrote it did
    not), through the same open file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def read_marker(path: str | Path) -> Optional[dict]:
    f = Path(path) / COMPLETE
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("step"), int) else None


def verify(path: str | Path, checksums: bool = True) -> tuple[bool, str]:
    """(ok, reason): the marker exists and every file it lists is present with its recorded size and (with
    ``checksums``) sha256. The reason names the checkpoint and the first bad file."""
    path = Path(path)
    m = read_marker(path)
    if m is None:
        return False, f"{path}: no valid {COMPLETE}"
    for rel, rec in (m.get("files") or {}).items():
        # Markers written before checksums existed hold the size only.
        size, digest = (rec.get("size"), rec.get("sha256")) if isinstance(rec, dict) else (rec, None)
        f = path / rel
        if not f.is_file():
            return False, f"{path}: {rel} listed in {COMPLETE} is missing"
        if f.stat().st_size != size:
            return False, f"{path}: {rel} has {f.stat().st_size} bytes, {COMPLETE} says {size}"
        if checksums and digest is not None:
            actual = file_sha256(f)
            if actual != digest:
                return False, f"{path}: {rel} is corrupt (sha256 {actual[:12]}..., {COMPLETE} says {digest[:12]}...)"
    return True, ""


def scan(run_dir: str | Path) -> list[CheckpointEntry]:
    """All checkpoint directories of a run, committed and partial, sorted by (step, revision), partials first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        m = _STEP_RE.match(p.name)
        if m:
            marker = read_marker(p)
            ok = marker is not None and marker["step"] == int(m.group(1))
            rev = int(m.group(2) or 0)
            out.append(CheckpointEntry(p, int(m.group(1)), complete=ok, partial=not ok, revision=rev))
            continue
        t = _TMP_RE.match(p.name)
        if t:
            out.append(CheckpointEntry(p, int(t.group(1)), complete=False, partial=True))
        elif _TRASH_RE.match(p.name):
            out.append(CheckpointEntry(p, -1, complete=False, partial=True))
    return sorted(out, key=lambda e: (e.step, e.complete, e.revision, e.name))


def complete_checkpoints(run_dir: str | Path) -> list[CheckpointEntry]:
    """Committed checkpoints, oldest first (a step's revisions in commit order)."""
    return [e for e in scan(run_dir) if e.complete]


def latest_complete(
    run_dir: str | Path, verify_files: bool = True, on_skip: Optional[Callable[[str], None]] = None
) -> Optional[CheckpointEntry]:
    """The newest committed checkpoint whose files check out (sha256 of each with ``verify_files``); a damaged
    newer one is skipped with a message naming the file (logged, and passed to ``on_skip``)."""
    for e in reversed(complete_checkpoints(run_dir)):
        if not verify_files:
            return e
        ok, why = verify(e.path)
        if ok:
            return e
        msg = f"skipping damaged checkpoint {why}; falling back to an older one"
        log.warning(msg)
        if on_skip is not None:
            on_skip(msg)
    return None


def _next_revision(root: Path, step: int) -> int:
    revs = [
        int(m.group(2) or 0)
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_RE.match(p.name)) and int(m.group(1)) == step
    ]
    return max(revs) + 1 if revs else 0


def _discard(path: Path) -> None:
    """Delete a directory so that it never looks half-there: rename it to ``.trash-*`` first (atomic), then
    remove it. A crash mid-delete leaves a ``.trash-*`` leftover, which never counts and is removed later."""
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def commit(tmp: str | Path, step: int, extra: Optional[dict] = None) -> Path:
    """Make ``tmp`` a committed checkpoint: fsync and checksum every file, write the marker (fsynced), then
    atomically rename the folder to ``step_NNNNNNNN`` (``step_NNNNNNNN.rK`` if that step is already committed).

    Call once, from one process, after every rank has finished writing into ``tmp``. Older revisions of the
    same step are deleted only after the new one is in place, so a crash at any point leaves a complete copy."""
    tmp = Path(tmp)
    if not tmp.is_dir():
        raise CheckpointError(f"{tmp}: nothing to commit (directory missing)")
    sizes = list_files(tmp)
    if not sizes:
        raise CheckpointError(f"{tmp}: nothing to commit (no files written)")
    files = {rel: {"size": size, "sha256": file_sha256(tmp / rel, fsync=True)} for rel, size in sizes.items()}
    for d in sorted({(tmp / rel).parent for rel in sizes}, key=lambda p: -len(p.parts)):
        _fsync_dir(d)  # the directory entries of the files, deepest first
    marker = {"step": int(step), "committed_at": time.time(), "files": files, **(extra or {})}
    _write_json_durable(tmp / COMPLETE, marker)
    root = tmp.parent
    revision = _next_revision(root, step)
    final = root / step_dir_name(step, revision)
    older = [e.path for e in scan(root.parent) if e.step == step and e.complete and e.revision < revision]
    os.rename(tmp, final)
    _fsync_dir(root)
    for p in older:  # superseded revisions go only now that the new one is committed
        _discard(p)
    return final


def rotation_plan(
    entries: Iterable[CheckpointEntry], num_to_keep: int, protect: Iterable[str | Path] = ()
) -> list[Path]:
    """Directories to delete: committed checkpoints beyond the newest ``num_to_keep`` steps, older revisions of a
    step committed again, and partial leftovers.

    Invariants (tested): the newest complete checkpoint is never deleted (so a run never drops to zero
    committed checkpoints, whatever ``num_to_keep`` says), and nothing in ``protect`` (e.g. a directory being
    written right now, or the checkpoint being resumed from) is deleted."""
    if num_to_keep < 1:
        raise ValueError("num_to_keep must be >= 1")
    entries = list(entries)
    protected = {Path(p).resolve() for p in protect}
    complete = sorted((e for e in entries if e.complete), key=lambda e: (e.step, e.revision))
    newest_rev: dict[int, CheckpointEntry] = {}
    for e in complete:
        newest_rev[e.step] = e  # sorted, so the last one per step wins
    kept_steps = sorted(newest_rev)[-num_to_keep:]
    keep = {newest_rev[s].path.resolve() for s in kept_steps}
    delete = [e.path for e in complete if e.path.resolve() not in keep]
    delete += [e.path for e in entries if e.partial]
    return [p for p in delete if p.resolve() not in protected and p.resolve() not in keep]


def apply_rotation(run_dir: str | Path, num_to_keep: int, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Delete what :func:`rotation_plan` says (committed ones renamed away first); returns the deleted paths."""
    plan = rotation_plan(scan(run_dir), num_to_keep, protect)
    for p in plan:
        if _STEP_RE.match(p.name):
            _discard(p)
        else:
            shutil.rmtree(p, ignore_errors=True)
    return plan


def write_state(path: str | Path, state: dict) -> None:
    _write_json_durable(Path(path) / STATE, state)


def read_state(path: str | Path) -> dict:
    f = Path(path) / STATE
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read trainer state ({e})") from e


@dataclass(frozen=True)
class ResumePlan:
    """How a (re)started worker group continues."""

    checkpoint: Optional[Path]  # None: start from the base model
    step: int = 0
    epoch: int = 0
    epoch_rows: int = 0  # rows of ``epoch`` consumed by all workers together
    samples_seen: int = 0
    mode: str = "fresh"  # fresh | exact (DeepSpeed state) | weights (HF weights only; new optimizer state)
    reason: str = ""
    skipped: tuple[str, ...] = ()  # damaged newer checkpoints passed over (messages name the file)


def plan_resume(run_dir: str | Path, world_size: int, zero_stage: int) -> ResumePlan:
    """Resume from the newest valid committed checkpoint of the run (every file's sha256 checked).

    ``exact`` reloads the DeepSpeed engine state (weights, optimizer, LR schedule). ZeRO stages 1-3 partition
    the optimizer state by data-parallel rank, so after an elastic resize to another world size only the weights
    (the HF copy), step counter, LR position and data position carry over; Adam moments restart (``weights``)."""
    skipped: list[str] = []
    e = latest_complete(run_dir, on_skip=skipped.append)
    if e is None:
        why = "no committed checkpoint" + (f" ({'; '.join(skipped)})" if skipped else "")
        return ResumePlan(None, reason=why, skipped=tuple(skipped))
    st = read_state(e.path)
    same = st.get("world_size") == world_size and st.get("zero_stage") == zero_stage
    mode = "exact" if same or (zero_stage == 0 and st.get("zero_stage") == 0) else "weights"
    reason = (
        ""
        if mode == "exact"
        else (
            f"saved with world_size={st.get('world_size')} zero_stage="
            f"{st.get('zero_stage')}, now {world_size}/{zero_stage}: optimizer "
            "state is partitioned per rank, restarting Adam moments"
        )
    )
    if skipped:
        reason = "; ".join([*skipped, reason] if reason else skipped)
    return ResumePlan(
        e.path,
        step=int(st["step"]),
        epoch=int(st.get("epoch", 0)),
        epoch_rows=int(st.get("epoch_rows", 0)),
        samples_seen=int(st.get("samples_seen", 0)),
        mode=mode,
        reason=reason,
        skipped=tuple(skipped),
    )
