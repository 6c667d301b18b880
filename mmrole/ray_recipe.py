"""The life of a training recipe on one Ray Train worker, shared by every recipe (SFT, DPO, GRPO): resume,
model and engine set-up, the step loop over this rank's data stream, periodic validation and checkpoints, logging,
and the end of the run.

A recipe subclasses :class:`Recipe` and says what one optimizer step is (:meth:`Recipe.optimizer_step`) and, if
it validates, how (:meth:`Recipe.evaluate`). The parts live in their own modules: model and DeepSpeed engine
(:mod:`mmrole.ray_recipe_engine`), data stream and model batches (:mod:`mmrole.ray_recipe_data`), checkpoints
(:mod:`mmrole.ray_recipe_checkpoint`). What a step trains on depends only on (seed, epoch, position), so a resumed
run continues exactly where its checkpoint left off.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mmrole.ray_recipe_checkpoint import RecipeCheckpoints, ray_report
from mmrole.ray_recipe_data import MicroBatch, ModelBatcher, RankDataStream
from mmrole.ray_recipe_engine import TrainEngine, build_train_engine
from mmrole.train import checkpoint as ckpt
from mmrole.train.config import TrainJobConfig, batch_geometry, total_optimizer_steps
from mmrole.train.ds_config import resolve_precision
from mmrole.train.metrics import MetricsSink, StepStats, progress_line
from mmrole.train.schedule import make_schedule
from mmrole.train.step import StepTotals

ROW_LOG_DIR = "row_log"
DATA_ORDER_SCHEME = "strided-permutation-v1"


def say(msg: str) -> None:
    """Progress line from a worker. Ray Train V2 patches print() into its logger (which also echoes it), so write
    to stdout directly to get each line once."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


@dataclass
class WorkerInfo:
    """Where this worker stands: rank, world size, device, and how to report a committed checkpoint (Ray)."""

    rank: int
    world: int
    device: torch.device
    report: Optional[Callable[[dict, Optional[Path]], None]] = None


@dataclass
class Position:
    """Training progress: optimizer step, and where in which epoch's row order the data stands."""

    step: int = 0
    epoch: int = 0
    epoch_position: int = 0  # rows of ``epoch``'s order consumed by all ranks together (a prefix)
    samples_seen: int = 0
    last_saved: int = -1

    @classmethod
    def from_plan(cls, plan: ckpt.ResumePlan) -> Position:
        return cls(plan.step, plan.epoch, plan.epoch_rows, plan.samples_seen, last_saved=plan.step)


@dataclass
class StepOutcome:
    """One optimizer step as the loop logs it: the token and sample totals over all ranks, and the recipe's own
    figures (e.g. DPO's reward margin), logged beside them."""

    totals: StepTotals
    metrics: dict = field(default_factory=dict)
    stop: Optional[str] = None  # the recipe ends the run after this step (e.g. GRPO's failure cap), and why


class Recipe:
    """Training on one Ray Train worker. Subclasses implement :meth:`optimizer_step` (and may override
    :meth:`evaluate`, :meth:`build_engine`, :meth:`checkpoint_state`)."""

    name = "recipe"
    config_class: type[TrainJobConfig] = TrainJobConfig  # the job config this recipe reads
    encoder_options: dict = {}  # extra RowEncoder arguments of this recipe's rows

    def __init__(self, cfg: TrainJobConfig, run_dir: Path, n_rows: int, worker: WorkerInfo):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.n_rows = int(n_rows)  # rows trained on per epoch; the next data.eval_rows rows are held out
        self.rank, self.world, self.device = worker.rank, worker.world, worker.device
        self.report = worker.report
        t = cfg.train
        self.precision = resolve_precision(t.precision, self.device.type)
        self.geo = batch_geometry(t.global_batch_size, t.micro_batch_size, self.world)
        self.total_steps = total_optimizer_steps(self.n_rows, t.epochs, self.geo, t.max_steps)
        self.schedule = make_schedule(self.total_steps, t.schedule, t.warmup_ratio, t.warmup_steps, t.min_lr_ratio)
        self.pos = Position()
        self.attempt = uuid.uuid4().hex[:10]
        self.sink: Optional[MetricsSink] = None
        self.last_metrics: dict = {}
        self.resume_plan: Optional[ckpt.ResumePlan] = None
        self.checkpoints = RecipeCheckpoints(
            self.run_dir, self.rank, self.world, self.device, cfg.checkpoint.num_to_keep, say
        )
        self.data = RankDataStream(cfg, self.run_dir, self.n_rows, self.rank, self.world, self.encoder_options)
        self.stream: Optional[Iterator[MicroBatch | int]] = None
        self.trained: Optional[TrainEngine] = None
        self.batcher: Optional[ModelBatcher] = None
        self.build_s = 0.0

    # ---- the trained model ---------------------------------------------------------------------------------------
    @property
    def engine(self):
        """The DeepSpeed engine (forward, backward, step)."""
        return self.trained.engine

    @property
    def vlm(self):
        return self.trained.vlm

    @property
    def packing(self) -> bool:
        return self.batcher.packing

    @property
    def partitioned_at_build(self) -> bool:
        return self.trained.partitioned_at_build

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Resume position, the data stream (started first: its encoders come up while the model builds), the model
        and DeepSpeed engine, loaded from the run's newest committed checkpoint if any."""
        torch.manual_seed(self.cfg.train.seed)
        plan, self.attempt = self.checkpoints.resume_plan(self.cfg.train.zero_stage, self.attempt)
        self.resume_plan = plan
        self.pos = Position.from_plan(plan)
        if self.pos.step < self.total_steps:
            self.stream = self.data.micro_batches(self.pos.epoch, self.pos.epoch_position, self.geo.grad_accum)
        t_build = time.time()
        weights_from = plan.checkpoint / ckpt.HF_DIR if plan.mode == "weights" else None
        self.trained = self.build_engine(weights_from)
        self.trained.load(plan, self.cfg.train.lr, self.schedule)
        self.batcher = ModelBatcher(self.cfg, self.trained.vlm)
        self.build_s = time.time() - t_build

    def build_engine(self, weights_from: Optional[Path]) -> TrainEngine:
        """The trained model and its DeepSpeed engine (recipes that need more models build them here too)."""
        return build_train_engine(
            self.cfg, self.device, self.precision, self.geo, self.schedule, self.rank, weights_from
        )

    def setup_data(self) -> None:
        """This rank's encoders (also for validation when no training is left to do)."""
        self.data.start_encoders(self.geo.grad_accum)

    def start_log(self) -> None:
        if self.rank != 0:
            return
        self.sink = MetricsSink.for_job(self.cfg, self.run_dir, self.attempt)
        plan = self.resume_plan
        info = dict(
            recipe=self.name,
            world_size=self.world,
            grad_accum=self.geo.grad_accum,
            global_batch=self.geo.global_batch_size,
            micro_batch=self.geo.micro_batch_size,
            total_steps=self.total_steps,
            precision=self.precision,
            packing=self.packing,
            zero_stage=self.cfg.train.zero_stage,
            device=str(self.device),
            model_build_s=round(self.build_s, 2),
            trainable_params=self.trained.trainable_params,
            partitioned_at_build=self.partitioned_at_build,
            n_rows=self.n_rows,
        )
        if plan is not None and plan.checkpoint is not None:
            self.sink.event(
                "resume",
                from_step=plan.step,
                checkpoint=str(plan.checkpoint),
                mode=plan.mode,
                reason=plan.reason,
                epoch=plan.epoch,
                epoch_position=plan.epoch_rows,
                **info,
            )
            say(f"[mmrole] resuming from step {plan.step} ({plan.mode}) {plan.checkpoint} {plan.reason}".rstrip())
        else:
            self.sink.event("start", **info)
        say(
            f"[mmrole] {self.world} worker(s), ZeRO-{self.cfg.train.zero_stage}, {self.precision}, micro "
            f"{self.geo.micro_batch_size} x accum {self.geo.grad_accum} x {self.world} = "
            f"{self.geo.global_batch_size}/step, {self.total_steps} steps"
        )

    # ---- what a recipe defines -------------------------------------------------------------------------------------
    def optimizer_step(self, micro: list[list[dict]], data_wait_s: float) -> StepOutcome:
        """Forward/backward over this rank's ``micro`` (one list of encoded samples per micro-batch) and one
        optimizer step; collective."""
        raise NotImplementedError

    def evaluate(self) -> Optional[dict]:
        """Validation on the held-out rows (collective); None when the recipe or the run has none."""
        return None

    def checkpoint_state(self) -> dict:
        """trainer_state.json of a checkpoint: position, data order and the run's identity."""
        pos, cfg = self.pos, self.cfg
        return {
            "step": pos.step,
            "epoch": pos.epoch,
            "epoch_rows": pos.epoch_position,
            "samples_seen": pos.samples_seen,
            "data_order": {"scheme": DATA_ORDER_SCHEME, "seed": cfg.data.shuffle_seed, "n_rows": self.n_rows},
            "world_size": self.world,
            "zero_stage": cfg.train.zero_stage,
            "total_steps": self.total_steps,
            "kind": cfg.kind,
            "recipe": self.name,
            "run_name": cfg.run_name,
            "base_model": cfg.model.model_path,
            "lora": cfg.model.lora is not None,
            "time": time.time(),
        }

    # ---- loop ------------------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Steps until ``total_steps`` or the data of the last epoch runs out; checkpoints every N steps."""
        pos, g = self.pos, self.geo.grad_accum
        if pos.step >= self.total_steps:
            if self.rank == 0 and self.resume_plan and self.resume_plan.checkpoint is not None:
                say(f"[mmrole] nothing left to train: the run is complete at step {pos.step}")
            return
        pending: list[MicroBatch] = []
        t_step = time.time()
        if self.stream is None:
            self.stream = self.data.micro_batches(pos.epoch, pos.epoch_position, g)
        stream = self.stream
        for item in stream:
            if isinstance(item, int):
                self._epoch_end(item)
                continue
            pending.append(item)
            if len(pending) < g:
                continue
            lr = self.trained.lr
            outcome = self.optimizer_step([mb.samples for mb in pending], sum(mb.wait_s for mb in pending))
            last = pending[-1].plan
            pos.step += 1
            pos.epoch, pos.epoch_position = last.epoch, last.end_position
            pos.samples_seen += outcome.totals.samples
            self._log_rows(pending)
            self._log_step(outcome, lr, time.time() - t_step)
            pending = []
            if outcome.stop:
                self._stop(outcome.stop)
                break
            self._maybe_kill()
            every = self.cfg.train.eval_every
            if every and pos.step % every == 0 and pos.step < self.total_steps:
                self.evaluate()
            if pos.step % self.cfg.checkpoint.every_steps == 0 or pos.step >= self.total_steps:
                self.save()
            t_step = time.time()
            if pos.step >= self.total_steps:
                break
        stream.close()
        self.stream = None

    def _stop(self, reason: str) -> None:
        """The recipe ended the run early: an event the driver turns into ``"ok": false``, and a message."""
        if self.rank == 0 and self.sink is not None:
            self.sink.event("stopped", step=self.pos.step, reason=reason)
        if self.rank == 0:
            say(f"[mmrole] stopping at step {self.pos.step}: {reason}")

    def _epoch_end(self, epoch: int) -> None:
        if self.rank == 0 and self.sink is not None:
            self.sink.event("epoch_end", epoch=epoch, step=self.pos.step)
            say(f"[mmrole] epoch {epoch} done at step {self.pos.step}")

    def _log_step(self, outcome: StepOutcome, lr: float, step_s: float) -> None:
        totals = outcome.totals
        stats = StepStats(
            step=self.pos.step,
            loss=totals.loss_sum,
            lr=lr,
            samples=totals.samples,
            text_tokens=totals.text_tokens,
            image_tokens=totals.image_tokens,
            target_tokens=totals.target_tokens,
            step_time_s=step_s,
            data_wait_s=totals.data_wait_s / self.world,
            grad_norm=self.trained.grad_norm(),
            epoch=self.pos.epoch,
        )
        self.last_metrics = stats.as_dict() | outcome.metrics
        if self.rank == 0:
            self.sink.write(self.last_metrics)
            if self.pos.step % self.cfg.train.log_every == 0 or self.pos.step == self.total_steps:
                say("[mmrole] " + progress_line(self.last_metrics, self.total_steps))

    def log_eval(self, rec: dict, label: str) -> None:
        """A validation record into metrics.jsonl (rank 0) and one console line."""
        if self.rank == 0 and self.sink is not None:
            self.sink.write(rec)
            say(f"[mmrole] eval at step {rec['step']}: {label}")

    def _log_rows(self, pending: list[MicroBatch]) -> None:
        """Debug: the row ids this rank trained on in this step (``debug.record_rows``)."""
        if not self.cfg.debug.record_rows:
            return
        d = self.run_dir / ROW_LOG_DIR
        d.mkdir(parents=True, exist_ok=True)
        rec = {
            "attempt": self.attempt,
            "step": self.pos.step,
            "rank": self.rank,
            "epochs": [mb.plan.epoch for mb in pending],
            "ids": [[s["id"] for s in mb.samples] for mb in pending],
        }
        with open(d / f"rank{self.rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _maybe_kill(self) -> None:
        """Fault injection (tests): SIGKILL this worker once per run directory."""
        d, step = self.cfg.debug, self.pos.step
        if step not in d.kill_at_steps or self.rank != d.kill_rank:
            return
        marker = self.run_dir / f".fault_injected_step_{step}"
        if marker.exists():
            return
        marker.write_text(str(time.time()))
        say(f"[mmrole] debug: killing rank {self.rank} (pid {os.getpid()}) after step {step}")
        os.kill(os.getpid(), signal.SIGKILL)

    # ---- checkpoints and the end -----------------------------------------------------------------------------------
    def save(self) -> Path:
        """A committed checkpoint of the current step. Collective: all ranks call it."""
        step = self.pos.step
        final = self.checkpoints.save(
            step,
            self.attempt,
            lambda tmp: self.trained.save(tmp, step),
            self.checkpoint_state(),
            report=self.report,
            metrics=self.last_metrics,
            sink=self.sink,
        )
        self.pos.last_saved = step
        return final

    def finish(self) -> None:
        """Save what the last steps trained (data ran out before ``total_steps``), validate, log the end."""
        if self.pos.step > self.pos.last_saved:
            self.save()
        if self.last_metrics:  # this attempt trained: the final validation
            self.evaluate()
        if self.rank == 0 and self.sink is not None:
            self.sink.event(
                "end", step=self.pos.step, total_steps=self.total_steps, epoch=self.pos.epoch, world=self.world
            )
        if not self.last_metrics:
            self.checkpoints.report_existing(self.report)

    def close(self) -> None:
        if self.trained is not None:
            self.trained.close()
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.data.close()
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def run(self) -> None:
        """setup -> train -> finish (the whole life of a worker)."""
        try:
            self.setup()
            self.setup_data()
            self.start_log()
            self.train()
            self.finish()
        finally:
            self.close()


def run_on_ray_worker(recipe_cls: type[Recipe], config: dict) -> None:
    """What a Ray Train worker runs: the job config, this worker's rank and device, then ``recipe_cls(...).run()``.
    ``config``: ``cfg`` (a TrainJobConfig dict), ``run_dir``, ``n_rows``."""
    import ray.train
    import ray.train.torch

    cfg = recipe_cls.config_class.from_dict(config["cfg"], "<train_loop_config>")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    worker = WorkerInfo(rank, ctx.get_world_size(), device, ray_report(rank))
    recipe_cls(cfg, Path(config["run_dir"]), int(config["n_rows"]), worker).run()
