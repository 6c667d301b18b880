"""Checkpoints that cannot be lost: a save is killed (real SIGKILL, in a child process) before each filesystem
operation it makes in turn, and afterwards a complete, checksum-verified checkpoint must exist, be the old or
the new one, and a resumed run must pick it and save again. Also: a corrupt file (same size, other bytes) is
caught by its sha256 and resume falls back to the previous checkpoint with a message naming the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmrole.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# The save of mmrole.ray_train, minus the engine: every rank writes into a tmp dir, rank 0 writes the trainer state,
# commits and rotates. Filesystem calls are counted; the process SIGKILLs itself right before call number CRASH_AT.
CHILD = r"""
import os, shutil, signal, sys
run, step, keep, crash_at, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from mmrole.train import checkpoint as ckpt

count = [0]
def counted(fn):
    def wrapper(*a, **k):
        if count[0] == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
        return fn(*a, **k)
    return wrapper
for name in ("rename", "replace", "fsync", "unlink", "rmdir", "mkdir", "open"):
    setattr(os, name, counted(getattr(os, name)))

tmp = ckpt.tmp_dir(run, step, "t" + payload)
(tmp / "hf").mkdir(parents=True)
(tmp / "deepspeed" / "state").mkdir(parents=True)
(tmp / "hf" / "model.safetensors").write_bytes(payload.encode() * 1000)
(tmp / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(payload.encode() * 3000)
ckpt.write_state(tmp, {"step": step, "payload": payload, "world_size": 1, "zero_stage": 2})
final = ckpt.commit(tmp, step, {"world_size": 1})
ckpt.apply_rotation(run, keep, protect=[final])
print("OPS", count[0])
"""


def _save(run: Path, step: int, keep: int, payload: str, crash_at: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(run), str(step), str(keep), str(crash_at), payload],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _save_here(run: Path, step: int, keep: int, payload: str) -> None:
    """The same save in this process (no crash): sets up the checkpoints before the crash and saves after it."""
    tmp = ckpt.tmp_dir(run, step, "h" + payload)
    (tmp / "hf").mkdir(parents=True)
    (tmp / "deepspeed" / "state").mkdir(parents=True)
    (tmp / "hf" / "model.safetensors").write_bytes(payload.encode() * 1000)
    (tmp / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(payload.encode() * 3000)
    ckpt.write_state(tmp, {"step": step, "payload": payload, "world_size": 1, "zero_stage": 2})
    final = ckpt.commit(tmp, step, {"world_size": 1})
    ckpt.apply_rotation(run, keep, protect=[final])


def _newest(run: Path) -> tuple[int, str]:
    e = ckpt.latest_complete(run)
    assert e is not None, (
        f"no complete checkpoint left in {run}: {sorted(p.name for p in (run / 'checkpoints').iterdir())}"
    )
    ok, why = ckpt.verify(e.path)
    assert ok, why
    return e.step, ckpt.read_state(e.path)["payload"]


# (checkpoints before the save as (step, payload), num_to_keep, the step saved)
SCENARIOS = {
    "new_step_keep1": ([(4, "a")], 1, 8),
    "recommit_same_step_keep1": ([(8, "a")], 1, 8),
    "new_step_keep2": ([(4, "a"), (8, "b")], 2, 12),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sigkill_at_every_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, scenario):
    before, keep, step = SCENARIOS[scenario]
    probe = tmp_path / "probe"
    for s, p in before:
        assert _save(probe, s, keep, p).returncode == 0
    done = _save(probe, step, keep, "new")
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.split("OPS")[-1])
    assert total > 10  # the save does make that many filesystem calls: every one of them is a crash point
    old_step, old_payload = before[-1]
    outcomes = set()
    for crash_at in range(total):
        run = tmp_path / f"crash_{crash_at}"
        for s, p in before:
            _save_here(run, s, keep, p)
        r = _save(run, step, keep, "new", crash_at=crash_at)
        assert r.returncode == -signal.SIGKILL, (crash_at, r.returncode, r.stderr)
        got = _newest(run)
        # Either the save did not happen (the old newest is intact) or it did (the new one, verified).
        assert got in {(old_step, old_payload), (step, "new")}, (crash_at, got)
        outcomes.add(got)
        # The next attempt resumes from it, cleans up the leftovers and saves again.
        plan = ckpt.plan_resume(run, world_size=1, zero_stage=2)
        assert (plan.step, plan.mode) == (got[0], "exact")
        ckpt.apply_rotation(run, keep, protect=[plan.checkpoint])
        assert _newest(run) == got
        _save_here(run, step, keep, "again")
        assert _newest(run) == (step, "again")
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert not [n for n in names if n.startswith(".")], names  # no leftovers after a clean save
        assert len(ckpt.complete_checkpoints(run)) <= keep
    # Both outcomes were seen: the crash points cover the moment of the commit.
    assert outcomes == {(old_step, old_payload), (step, "new")}


def test_corrupt_file_is_caught_by_checksum_and_resume_falls_back(tmp_path):
    for s, p in ((4, "a"), (8, "b")):
        _save_here(tmp_path, s, 2, p)
    newest = ckpt.latest_complete(tmp_path)
    f = newest.path / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    f.write_bytes(bytes(data))
    assert ckpt.verify(newest.path, checksums=False)[0]
    ok, why = ckpt.verify(newest.path)
    assert not ok and "deepspeed/state/mp_rank_00_model_states.pt" in why and "sha256" in why
    skipped = []
    assert ckpt.latest_complete(tmp_path, on_skip=skipped.append).step == 4
    assert len(skipped) == 1 and "mp_rank_00_model_states.pt" in skipped[0] and "step_00000008" in skipped[0]
    plan = ckpt.plan_resume(tmp_path, world_size=1, zero_stage=2)
    assert plan.step == 4 and plan.skipped and "mp_rank_00_model_states.pt" in plan.reason
    # The run keeps the checkpoint it resumes from even with num_to_keep 1.
    ckpt.apply_rotation(tmp_path, 1, protect=[plan.checkpoint])
    assert plan.checkpoint.is_dir() and ckpt.latest_complete(tmp_path).step == 4


def test_recommit_keeps_old_revision_until_new_is_in_place(tmp_path):
    _save_here(tmp_path, 8, 1, "a")
    t = ckpt.tmp_dir(tmp_path, 8, "x")
    (t / "hf").mkdir(parents=True)
    (t / "hf" / "model.safetensors").write_bytes(b"new")
    ckpt.write_state(t, {"step": 8, "payload": "b"})
    entries = ckpt.scan(tmp_path)
    assert [(e.name, e.complete) for e in entries if e.complete] == [("step_00000008", True)]
    final = ckpt.commit(t, 8)
    assert final.name == "step_00000008.r1"
    assert [e.name for e in ckpt.complete_checkpoints(tmp_path)] == ["step_00000008.r1"]
    # A leftover older revision (crash before its removal) never wins over the newer one and is rotated away.
    older = tmp_path / "checkpoints" / "step_00000008"
    older.mkdir()
    (older / "x").write_text("x")
    (older / ckpt.COMPLETE).write_text('{"step": 8, "files": {"x": {"size": 1}}}')
    assert ckpt.latest_complete(tmp_path).name == "step_00000008.r1"
    assert ckpt.apply_rotation(tmp_path, 2) == [older] and not older.exists()
