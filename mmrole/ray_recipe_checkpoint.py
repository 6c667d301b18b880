"""Checkpoints of a training recipe on Ray Train: which checkpoint every rank resumes from, and the save protocol
(write into a temporary directory -> mark complete -> rename -> report to Ray -> rotate; see
:mod:`mmrole.train.checkpoint`). What Ray gets is a small commit record (step + path), never the heavy data."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from mmrole.train import checkpoint as ckpt
from mmrole.train.dist import broadcast

RAY_COMMIT_PREFIX = "ray_commit-"
COMMIT_RECORD = "commit.json"

Report = Callable[[dict, Optional[Path]], None]


class RecipeCheckpoints:
    """The run directory's checkpoints as one rank sees them. Every method is collective (all ranks call it)."""

    def __init__(self, run_dir: Path, rank: int, world: int, device: torch.device, num_to_keep: int, say=print):
        self.run_dir = Path(run_dir)
        self.rank, self.world, self.device = rank, world, device
        self.num_to_keep = num_to_keep
        self.say = say

    def resume_plan(self, zero_stage: int, attempt: str) -> tuple[ckpt.ResumePlan, str]:
        """Rank 0 decides (one directory scan) and tells the others, so every rank resumes from the same
        checkpoint; leftovers of a crashed attempt (``.tmp-*``) go, committed checkpoints stay. Returns the plan and
        rank 0's attempt id."""
        plan, attempt = broadcast(
            (ckpt.plan_resume(self.run_dir, self.world, zero_stage), attempt) if self.rank == 0 else None,
            self.device,
        )
        if self.rank == 0:
            protect = [plan.checkpoint] if plan.checkpoint else []
            ckpt.apply_rotation(self.run_dir, self.num_to_keep, protect=protect)
        dist.barrier()
        return plan, attempt

    def save(
        self,
        step: int,
        attempt: str,
        write: Callable[[Path], None],
        state: dict,
        report: Optional[Report] = None,
        metrics: Optional[dict] = None,
        sink: Any = None,
    ) -> Path:
        """Commit the checkpoint of ``step``: ``write(tmp)`` puts every rank's part in the temporary directory,
        rank 0 adds ``state`` (trainer_state.json) and commits it; then Ray is told and old ones rotate out."""
        t0 = time.time()
        tmp = ckpt.tmp_dir(self.run_dir, step, attempt)
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        write(tmp)
        if self.rank == 0:
            ckpt.write_state(tmp, state)
        dist.barrier()  # every rank's optimizer partition is on disk before the commit
        final = ckpt.commit(tmp, step, {"world_size": self.world}) if self.rank == 0 else None
        final = Path(broadcast(str(final) if final else None, self.device))
        if report is not None:
            report((metrics or {}) | {"step": step, "checkpoint": str(final)}, final)
        if self.rank == 0:
            deleted = ckpt.apply_rotation(self.run_dir, self.num_to_keep, protect=[final])
            if sink is not None:
                sink.event(
                    "checkpoint",
                    step=step,
                    path=str(final),
                    seconds=round(time.time() - t0, 3),
                    deleted=[p.name for p in deleted],
                )
            self.say(f"[mmrole] checkpoint step {step} committed: {final} ({time.time() - t0:.1f}s)")
        return final

    def report_existing(self, report: Optional[Report]) -> None:
        """Ray attaches metrics to the result only with a checkpoint: a run that trained nothing in this attempt
        (already complete) reports its newest committed one."""
        latest = ckpt.latest_complete(self.run_dir, verify_files=False)
        if latest is not None and report is not None:
            report({"step": latest.step, "checkpoint": str(latest.path), "already_complete": True}, latest.path)


def ray_report(rank: int) -> Report:
    """Report a committed checkpoint to Ray as a small commit record (rank 0); other ranks report no checkpoint."""
    import ray.train

    def report(metrics: dict, committed: Optional[Path]) -> None:
        if rank != 0 or committed is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="mmrole-commit-", ignore_cleanup_errors=True) as d:
            (Path(d) / COMMIT_RECORD).write_text(json.dumps({"step": metrics["step"], "path": str(committed)}))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"{RAY_COMMIT_PREFIX}{committed.name}-{uuid.uuid4().hex[:6]}",
            )

    return report
