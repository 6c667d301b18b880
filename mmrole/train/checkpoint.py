"""Checkpoint commit and rotation rules (pure filesystem logic, no torch/DeepSpeed/Ray).

Layout of a run directory::

    <run_dir>/checkpoints/.tmp-step_00000040-<token>/   being written (all ranks write here)
    <run_dir>/checkpoints/step_00000040/                committed: renamed from .tmp-* after COMPLETE.json
        COMPLETE.json        commit marker: step + every file with its size (written last, before the rename)
        trainer_state.json   step, epoch, rows consumed in the epoch, world size, ... (what resume needs)
        hf/                  Hugging Face model (safetensors; the adapter only for LoRA) + processor files
        deepspeed/           DeepSpeed engine state (module, optimizer partitions, LR scheduler) for exact resume

Only a directory named ``step_*`` that holds a valid COMPLETE.json counts. A crash at any point leaves either
the previous committed checkpoints untouched or a ``.tmp-*`` directory that the next run deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"
STATE = "trainer_state.json"
HF_DIR = "hf"
DS_DIR = "deepspeed"
DS_TAG = "state"  # DeepSpeed checkpoint tag (subfolder of deepspeed/)
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-step_(\d{8,})-[A-Za-z0-9_.-]+$")
_TRASH_RE = re.compile(r"^\.trash-")


class CheckpointError(RuntimeError):
    """A checkpoint directory that is not usable; the message names it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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


def list_files(root: Path) -> dict[str, int]:
    """Every regular file under ``root`` (relative POSIX path -> size), the marker excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            out[p.relative_to(root).as_posix()] = p.stat().st_size
    return out


def read_marker(path: str | Path) -> Optional[dict]:
    f = Path(path) / COMPLETE
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("step"), int) else None


def verify(path: str | Path) -> tuple[bool, str]:
    """(ok, reason): the marker exists and every file it lists is present with its recorded size."""
    path = Path(path)
    m = read_marker(path)
    if m is None:
        return False, f"{path}: no valid {COMPLETE}"
    for rel, size in (m.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return False, f"{path}: {rel} listed in {COMPLETE} is missing"
        if f.stat().st_size != size:
            return False, f"{path}: {rel} has {f.stat().st_size} bytes, {COMPLETE} says {size}"
    return True, ""


def scan(run_dir: str | Path) -> list[CheckpointEntry]:
    """All checkpoint directories of a run, committed and partial, sorted by step (partials first per step)."""
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
            out.append(CheckpointEntry(p, int(m.group(1)), complete=ok, partial=not ok))
            continue
        t = _TMP_RE.match(p.name)
        if t:
            out.append(CheckpointEntry(p, int(t.group(1)), complete=False, partial=True))
        elif _TRASH_RE.match(p.name):
            out.append(CheckpointEntry(p, -1, complete=False, partial=True))
    return sorted(out, key=lambda e: (e.step, e.complete, e.name))


def complete_checkpoints(run_dir: str | Path) -> list[CheckpointEntry]:
    return [e for e in scan(run_dir) if e.complete]


def latest_complete(run_dir: str | Path, verify_files: bool = True) -> Optional[CheckpointEntry]:
    """The newest committed checkpoint whose files check out (an older one if the newest is damaged)."""
    for e in reversed(complete_checkpoints(run_dir)):
        if not verify_files or verify(e.path)[0]:
            return e
    return None


def commit(tmp: str | Path, step: int, extra: Optional[dict] = None) -> Path:
    """Mark ``tmp`` complete (marker listing every file, fsynced) and atomically rename it to ``step_NNNNNNNN``.

    Call once, from one process, after every rank has finished writing into ``tmp``. If a committed directory
    for the same step already exists (a step redone after a crash), it is replaced only after the new one is
    complete, so there is never a moment without a committed copy of that step."""
    tmp = Path(tmp)
    if not tmp.is_dir():
        raise CheckpointError(f"{tmp}: nothing to commit (directory missing)")
    files = list_files(tmp)
    if not files:
        raise CheckpointError(f"{tmp}: nothing to commit (no files written)")
    marker = {"step": int(step), "committed_at": time.time(), "files": files, **(extra or {})}
    _write_json_durable(tmp / COMPLETE, marker)
    final = tmp.parent / step_dir_name(step)
    trash = None
    if final.exists():
        trash = tmp.parent / f".trash-{final.name}-{int(time.time() * 1e6)}"
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def rotation_plan(
    entries: Iterable[CheckpointEntry], num_to_keep: int, protect: Iterable[str | Path] = ()
) -> list[Path]:
    """Directories to delete: committed checkpoints beyond the newest ``num_to_keep``, and partial leftovers.

    Invariants (tested): the newest complete checkpoint is never deleted (so a run never drops to zero
    committed checkpoints, whatever ``num_to_keep`` says), and nothing in ``protect`` (e.g. a directory being
    written right now) is deleted."""
    if num_to_keep < 1:
        raise ValueError("num_to_keep must be >= 1")
    entries = list(entries)
    protected = {Path(p).resolve() for p in protect}
    complete = sorted((e for e in entries if e.complete), key=lambda e: e.step)
    keep = {e.path.resolve() for e in complete[-num_to_keep:]}
    delete = [e.path for e in complete if e.path.resolve() not in keep]
    delete += [e.path for e in entries if e.partial]
    return [p for p in delete if p.resolve() not in protected and p.resolve() not in keep]


def apply_rotation(run_dir: str | Path, num_to_keep: int, protect: Iterable[str | Path] = ()) -> list[Path]:
    """Delete what :func:`rotation_plan` says; returns the deleted paths."""
    plan = rotation_plan(scan(run_dir), num_to_keep, protect)
    for p in plan:
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


def plan_resume(run_dir: str | Path, world_size: int, zero_stage: int) -> ResumePlan:
    """Resume from the newest valid committed checkpoint of the run.

    ``exact`` reloads the DeepSpeed engine state (weights, optimizer, LR schedule). ZeRO stages 1-3 partition
    the optimizer state by data-parallel rank, so after an elastic resize to another world size only the weights
    (the HF copy), step counter, LR position and data position carry over; Adam moments restart (``weights``)."""
    e = latest_complete(run_dir)
    if e is None:
        return ResumePlan(None, reason="no committed checkpoint")
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
    return ResumePlan(
        e.path,
        step=int(st["step"]),
        epoch=int(st.get("epoch", 0)),
        epoch_rows=int(st.get("epoch_rows", 0)),
        samples_seen=int(st.get("samples_seen", 0)),
        mode=mode,
        reason=reason,
    )
