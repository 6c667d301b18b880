"""The per-worker training recipe (Ray Train + DeepSpeed): ``setup`` (model, engine, resume), ``train`` (steps),
``train_step`` (one optimizer step), ``save`` (a committed checkpoint) and ``close``.

Ray Train calls :func:`train_loop_per_worker`, which builds an :class:`SFTRecipe` and runs it. The recipe reads its
rank's fixed share of each epoch's row order (:mod:`mmrole.train.data_order`), so what a step trains on depends only
on (seed, epoch, position) and a resumed run continues exactly where the checkpoint left off. The loss is
token-weighted over the whole global batch (:mod:`mmrole.train.step`).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist

from mmrole.train import checkpoint as ckpt
from mmrole.train.config import TrainJobConfig, batch_geometry, total_optimizer_steps
from mmrole.train.data_order import MicroBatchPlan, rank_micro_batches
from mmrole.train.ds_config import build_deepspeed_config, resolve_precision, split_decay
from mmrole.train.metrics import MetricsSink, StepStats, progress_line
from mmrole.train.packing import pack_samples, packed_batch
from mmrole.train.rejects import REJECTS_DIR
from mmrole.train.rows import batch_token_counts
from mmrole.train.schedule import make_schedule
from mmrole.train.step import StepTotals, backward_scale, count_target_tokens, summed_token_loss

RAY_COMMIT_PREFIX = "ray_commit-"
COMMIT_RECORD = "commit.json"
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


@dataclass
class MicroBatch:
    plan: MicroBatchPlan
    samples: list[dict] = field(default_factory=list)
    wait_s: float = 0.0


def broadcast(obj: Any, device: torch.device) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_full_state_dict(module: torch.nn.Module, rank: int) -> Optional[dict]:
    """A full state dict on rank 0 from ZeRO-3 partitioned parameters, one module's parameters at a time (public
    ``deepspeed.zero.GatheredParameters``), so no rank ever holds all the weights at once on the device. Keys are
    those of ``module.state_dict()`` (what ``save_pretrained`` expects). Collective: every rank must call it."""
    keys: dict[int, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        keys.setdefault(id(t), []).append(name)
    out: Optional[dict] = {} if rank == 0 else None
    for sub in module.modules():
        params = list(sub.parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if out is not None:
                    for p in params:
                        for k in keys.get(id(p), []):
                            out[k] = p.detach().to("cpu", copy=True)
        if out is not None:
            for b in sub.buffers(recurse=False):
                for k in keys.get(id(b), []):
                    out[k] = b.detach().to("cpu", copy=True)
    return out


class SFTRecipe:
    """Supervised fine-tuning on one Ray Train worker (agent or reward model: same loss on the target tokens)."""

    def __init__(self, cfg: TrainJobConfig, run_dir: Path, n_rows: int, worker: WorkerInfo):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.n_rows = int(n_rows)  # rows trained on per epoch; the next data.eval_rows rows are held out
        self.n_eval = int(cfg.data.eval_rows)
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
        self.encoders = None
        self.stream: Optional[Iterator[MicroBatch | int]] = None
        self.last_metrics: dict = {}
        self.resume_plan: Optional[ckpt.ResumePlan] = None
        self.hf_ds_config = None

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the model and DeepSpeed engine, and resume from the run's newest committed checkpoint if any."""
        from torch.optim.lr_scheduler import LambdaLR

        torch.manual_seed(self.cfg.train.seed)
        # Rank 0 decides (one directory scan) and tells the others, so every rank resumes from the same checkpoint.
        plan, self.attempt = broadcast(
            (ckpt.plan_resume(self.run_dir, self.world, self.cfg.train.zero_stage), self.attempt)
            if self.rank == 0
            else None,
            self.device,
        )
        self.resume_plan = plan
        if self.rank == 0:
            # Leftovers of a crashed attempt (.tmp-* dirs) go now; committed checkpoints are kept.
            protect = [plan.checkpoint] if plan.checkpoint else []
            ckpt.apply_rotation(self.run_dir, self.cfg.checkpoint.num_to_keep, protect=protect)
        dist.barrier()
        self.pos = Position(
            step=plan.step,
            epoch=plan.epoch,
            epoch_position=plan.epoch_rows,
            samples_seen=plan.samples_seen,
            last_saved=plan.step,
        )
        if self.pos.step < self.total_steps:
            # The data pipeline starts now: its encoder actors come up while the model is built and loaded.
            self.stream = self.micro_batches()

        t_build = time.time()
        ds_config = build_deepspeed_config(self.cfg.train, self.geo, self.device.type)
        self.hf_ds_config = None
        if self.cfg.train.zero_stage == 3:
            # zero.Init needs DeepSpeed's communication layer before deepspeed.initialize would set it up: wrap the
            # process group Ray Train already created (no second init).
            deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
            # transformers' DeepSpeed integration: from_pretrained builds the model inside deepspeed.zero.Init, so
            # every parameter is partitioned as it is created and no rank ever holds the full weights.
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay referenced while the model is built
        weights_from = plan.checkpoint / ckpt.HF_DIR if plan.mode == "weights" else None
        self.vlm = self._build_model(weights_from)
        params = [p for p in self.vlm.model.parameters() if p.requires_grad]
        self.trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
        self.partitioned_at_build = bool(params) and all(hasattr(p, "ds_id") for p in params)
        opt, groups = self._optimizer()
        schedule = self.schedule
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.vlm.model,
            optimizer=opt,
            model_parameters=groups if opt is None else None,
            # A plain function, not the schedule object: LambdaLR checkpoints the attributes of callable objects
            # and would restore the old schedule; this way a resumed run follows the current config's schedule.
            lr_scheduler=lambda o: LambdaLR(o, lambda step: schedule(step)),
            config=ds_config,
            dist_init_required=False,
        )
        self._resume(plan)
        self.packing = pack_samples(self.cfg, self.vlm.family)
        self.build_s = time.time() - t_build

    def _build_model(self, weights_from: Optional[Path]):
        from mmrole.models import build_vlm

        vcfg = copy.deepcopy(self.cfg.model)
        vcfg.device = str(self.device)
        vcfg.dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.precision]
        if weights_from is not None:
            # An elastic resize changed the world size: continue from the checkpoint's HF weights (an adapter dir
            # for LoRA, which build_vlm loads on top of its base as trainable).
            vcfg.model_path = str(weights_from)
            vcfg.lora = None
        vlm = build_vlm(vcfg)
        vlm.model.train()
        return vlm

    def _optimizer(self):
        t = self.cfg.train
        named = [(n, p) for n, p in self.vlm.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters (everything frozen?)")
        decay, no_decay = split_decay((n, p.ndim) for n, p in named)
        by_name = dict(named)
        groups = [
            {"params": [by_name[n] for n in decay], "weight_decay": t.weight_decay},
            {"params": [by_name[n] for n in no_decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if t.offload_optimizer:
            return None, groups  # DeepSpeed builds DeepSpeedCPUAdam from the config
        kw = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
        if self.device.type == "cuda":
            kw["fused"] = True
        return torch.optim.AdamW(groups, **kw), groups

    def _resume(self, plan: ckpt.ResumePlan) -> None:
        if plan.mode == "exact":
            load_path, _ = self.engine.load_checkpoint(
                str(plan.checkpoint / ckpt.DS_DIR),
                tag=ckpt.DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is None:
                raise ckpt.CheckpointError(f"{plan.checkpoint}: DeepSpeed could not load its state")
        if plan.checkpoint is not None:
            # Continue the schedule at the resumed step with the configured peak LR (also after a weights-only
            # resume).
            lr = self.cfg.train.lr
            self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
            self.scheduler.last_epoch = plan.step
            for group in self.scheduler.optimizer.param_groups:
                group["lr"] = lr * self.schedule(plan.step)

    def setup_data(self) -> None:
        """This rank's encoders (a Ray Data pipeline over CPU actors, or a local thread)."""
        from mmrole.ray_data_ingest import RankEncoders

        if self.encoders is not None:
            return
        d = self.cfg.data
        self.encoders = RankEncoders(
            d.encode_actors,
            d.encode_num_cpus,
            max(d.prefetch_batches, self.geo.grad_accum),
            memory_mb=d.prefetch_memory_mb,
            local_node=d.encode_on_worker_node,
            model=self.cfg.model.to_dict(),
            prepared=d.prepared,
            split=self.cfg.split,
            max_rows=self.n_rows + self.n_eval,
            rejects_dir=str(self.run_dir / REJECTS_DIR),
        )

    def start_log(self) -> None:
        if self.rank != 0:
            return
        self.sink = MetricsSink.for_job(self.cfg, self.run_dir, self.attempt)
        plan = self.resume_plan
        info = dict(
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
            trainable_params=self.trainable,
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

    # ---- data ------------------------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[MicroBatch | int]:
        """This rank's micro-batches from the current position to the end of the last epoch; an ``int`` marks the
        end of that epoch. The encoding starts at once (see :meth:`RankEncoders.encode`)."""
        self.setup_data()
        d, t = self.cfg.data, self.cfg.train
        items: list[MicroBatchPlan | int] = []  # plans, and after each epoch's plans that epoch's number
        epoch, start = self.pos.epoch, self.pos.epoch_position
        while epoch < t.epochs:
            items.extend(
                rank_micro_batches(self.n_rows, d.shuffle_seed, epoch, start, self.world, self.rank, t.micro_batch_size)
            )
            items.append(epoch)
            epoch, start = epoch + 1, 0
        encoded = self.encoders.encode([p for p in items if not isinstance(p, int)])
        return self._walk(items, encoded)

    @staticmethod
    def _walk(items: list[MicroBatchPlan | int], encoded: Iterator) -> Iterator[MicroBatch | int]:
        try:
            t0 = time.time()
            for item in items:
                if isinstance(item, int):
                    yield item
                    continue
                plan, rows = next(encoded)
                yield MicroBatch(plan, rows.samples, time.time() - t0)
                t0 = time.time()
        finally:
            encoded.close()  # stops the Ray Data pipeline when training ends before the data does (max_steps)

    @functools.cached_property
    def filler(self) -> dict:
        """An encoded sample for a micro-batch whose rows were all rejected (run with zero weight)."""
        from mmrole.train.row_encoder import filler_sample

        return filler_sample(self.vlm.encoder)

    def model_batch(self, rows: list[dict]) -> dict:
        """Encoded samples -> one model batch: packed rows (``data.packing``) or right-padded samples."""
        if self.packing:
            return packed_batch(self.vlm, rows, self.cfg.model.max_length)
        batch = self.vlm.pad_batch(rows)
        batch.pop("id", None)
        return batch

    # ---- one optimizer step --------------------------------------------------------------------------------------
    def train_step(self, micro: list[list[dict]], data_wait_s: float = 0.0) -> StepTotals:
        """Forward/backward over this rank's ``micro`` (one list of encoded samples per micro-batch; an empty list
        runs a filler sample with zero weight) and the optimizer step. Returns the totals summed over ranks."""
        if len(micro) != self.geo.grad_accum:
            raise ValueError(f"a step takes {self.geo.grad_accum} micro-batches per rank, got {len(micro)}")
        engine = self.engine
        local_tokens = sum(count_target_tokens(s["labels"]) for rows in micro for s in rows)
        num_tokens = int(allreduce_sum([local_tokens], self.device)[0])  # before any forward pass
        scale = backward_scale(self.world, num_tokens)
        totals = StepTotals(data_wait_s=data_wait_s)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for rows in micro:
            batch = self.vlm.to_device(self.model_batch(rows or [self.filler]))
            summed = summed_token_loss(engine, batch)
            if not rows:
                summed = summed * 0.0
            engine.backward(summed * scale, scale_wrt_gas=False)
            engine.step()
            loss_sum += summed.detach().float()  # stays on the device: no host sync per micro-step
            text_t, img_t, tgt_t = batch_token_counts(rows)
            totals.micro_batches += 1
            totals.samples += len(rows)
            totals.text_tokens += text_t
            totals.image_tokens += img_t
            totals.target_tokens += tgt_t
        local = torch.stack(
            [loss_sum.double()]
            + [torch.tensor(float(v), dtype=torch.float64, device=self.device) for v in totals.as_list()[1:]]
        )
        dist.all_reduce(local)
        summed_totals = StepTotals.from_list(local.tolist())
        summed_totals.loss_sum = summed_totals.loss_sum / max(num_tokens, 1)  # now the token-weighted mean
        return summed_totals

    # ---- validation ------------------------------------------------------------------------------------------------
    def evaluate(self) -> Optional[dict]:
        """Token-weighted loss on the held-out rows (each rank a fixed strided share; collective)."""
        if self.n_eval <= 0:
            return None
        mb = self.cfg.train.micro_batch_size
        mine = list(range(self.n_rows + self.rank, self.n_rows + self.n_eval, self.world))
        mine = mine[: self.n_eval // self.world]  # equal counts: every rank runs the same forward passes
        plans = [MicroBatchPlan(-1, tuple(mine[i : i + mb]), 0) for i in range(0, len(mine), mb)]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = samples = 0
        self.engine.eval()
        with torch.no_grad():
            for _, encoded in self.encoders.encode_local(plans):
                rows = encoded.samples
                batch = self.vlm.to_device(self.model_batch(rows or [self.filler]))
                summed = summed_token_loss(self.engine, batch).double()
                if rows:
                    loss_sum += summed
                    tokens += sum(count_target_tokens(s["labels"]) for s in rows)
                    samples += len(rows)
        self.engine.train()
        t = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=self.device)])
        t = torch.cat([t, torch.tensor([float(samples)], dtype=torch.float64, device=self.device)])
        dist.all_reduce(t)
        total_loss, total_tokens, total_samples = t.tolist()
        rec = {
            "step": self.pos.step,
            "eval_loss": total_loss / max(total_tokens, 1.0),
            "eval_samples": int(total_samples),
            "eval_target_tokens": int(total_tokens),
        }
        if self.rank == 0 and self.sink is not None:
            self.sink.write(rec)
            say(f"[mmrole] eval at step {rec['step']}: loss {rec['eval_loss']:.4f} ({rec['eval_samples']} samples)")
        return rec

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
            self.stream = self.micro_batches()
        stream = self.stream
        for item in stream:
            if isinstance(item, int):
                self._epoch_end(item)
                continue
            pending.append(item)
            if len(pending) < g:
                continue
            lr = self.optimizer.param_groups[0]["lr"]
            totals = self.train_step([mb.samples for mb in pending], sum(mb.wait_s for mb in pending))
            last = pending[-1].plan
            pos.step += 1
            pos.epoch, pos.epoch_position = last.epoch, last.end_position
            pos.samples_seen += totals.samples
            self._log_rows(pending)
            self._log_step(totals, lr, time.time() - t_step, totals.data_wait_s / self.world)
            pending = []
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

    def _epoch_end(self, epoch: int) -> None:
        if self.rank == 0 and self.sink is not None:
            self.sink.event("epoch_end", epoch=epoch, step=self.pos.step)
            say(f"[mmrole] epoch {epoch} done at step {self.pos.step}")

    def _log_step(self, totals: StepTotals, lr: float, step_s: float, wait_s: float) -> None:
        gn = self.engine.get_global_grad_norm()
        stats = StepStats(
            step=self.pos.step,
            loss=totals.loss_sum,
            lr=lr,
            samples=totals.samples,
            text_tokens=totals.text_tokens,
            image_tokens=totals.image_tokens,
            target_tokens=totals.target_tokens,
            step_time_s=step_s,
            data_wait_s=wait_s,
            grad_norm=float(gn) if gn is not None else None,
            epoch=self.pos.epoch,
        )
        self.last_metrics = stats.as_dict()
        if self.rank == 0:
            self.sink.write(self.last_metrics)
            if self.pos.step % self.cfg.train.log_every == 0 or self.pos.step == self.total_steps:
                say("[mmrole] " + progress_line(self.last_metrics, self.total_steps))

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

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write -> mark complete -> rename -> report to Ray -> rotate. Collective: all ranks call it."""
        t0 = time.time()
        pos, cfg = self.pos, self.cfg
        tmp = ckpt.tmp_dir(self.run_dir, pos.step, self.attempt)
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp / ckpt.DS_DIR), tag=ckpt.DS_TAG, client_state={"mmrole_step": pos.step})
        self._save_hf(tmp / ckpt.HF_DIR)
        state = {
            "step": pos.step,
            "epoch": pos.epoch,
            "epoch_rows": pos.epoch_position,
            "samples_seen": pos.samples_seen,
            "data_order": {"scheme": DATA_ORDER_SCHEME, "seed": cfg.data.shuffle_seed, "n_rows": self.n_rows},
            "world_size": self.world,
            "zero_stage": cfg.train.zero_stage,
            "total_steps": self.total_steps,
            "kind": cfg.kind,
            "run_name": cfg.run_name,
            "base_model": cfg.model.model_path,
            "lora": cfg.model.lora is not None,
            "time": time.time(),
        }
        if self.rank == 0:
            ckpt.write_state(tmp, state)
        dist.barrier()  # every rank's optimizer partition is on disk before the commit
        final = ckpt.commit(tmp, pos.step, {"world_size": self.world}) if self.rank == 0 else None
        final = Path(broadcast(str(final) if final else None, self.device))
        if self.report is not None:
            self.report(self.last_metrics | {"step": pos.step, "checkpoint": str(final)}, final)
        if self.rank == 0:
            deleted = ckpt.apply_rotation(self.run_dir, cfg.checkpoint.num_to_keep, protect=[final])
            if self.sink is not None:
                self.sink.event(
                    "checkpoint",
                    step=pos.step,
                    path=str(final),
                    seconds=round(time.time() - t0, 3),
                    deleted=[p.name for p in deleted],
                )
            say(f"[mmrole] checkpoint step {pos.step} committed: {final} ({time.time() - t0:.1f}s)")
        pos.last_saved = pos.step
        return final

    def _save_hf(self, out: Path) -> None:
        """Hugging Face copy of the model (adapter only for LoRA). Under ZeRO-3 the parameters are partitioned and
        are gathered module by module first (collective: every rank calls this)."""
        from mmrole.models.processor import save_processor

        state_dict = gather_full_state_dict(self.engine.module, self.rank) if self.cfg.train.zero_stage == 3 else None
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            kw: dict = {"safe_serialization": True}
            if state_dict is not None:
                # Gathered keys are the module's own; transformers 5's reverse renaming (original checkpoint
                # format) mis-maps them for a model built under zero.Init, so they are written as they are
                # (from_pretrained reads both layouts).
                kw.update(state_dict=state_dict, save_original_format=False)
            self.engine.module.save_pretrained(out, **kw)
            save_processor(self.vlm.processor, out)

    def finish(self) -> None:
        """Save what the last steps trained (data ran out before ``total_steps``), log the end, close."""
        if self.pos.step > self.pos.last_saved:
            self.save()
        if self.last_metrics:  # this attempt trained: the final validation loss
            self.evaluate()
        if self.rank == 0 and self.sink is not None:
            self.sink.event(
                "end", step=self.pos.step, total_steps=self.total_steps, epoch=self.pos.epoch, world=self.world
            )
        latest = ckpt.latest_complete(self.run_dir, verify_files=False)
        # Ray attaches metrics to the result only with a checkpoint; make sure a finished run has one.
        if not self.last_metrics and latest is not None and self.report is not None:
            self.report({"step": latest.step, "checkpoint": str(latest.path), "already_complete": True}, latest.path)

    def close(self) -> None:
        if self.hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self.hf_ds_config = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.encoders is not None:
            self.encoders.close()
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


# ============================================================================================== Ray Train entry


def ray_report(rank: int) -> Callable[[dict, Optional[Path]], None]:
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


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs: build the recipe and run it."""
    import ray.train
    import ray.train.torch

    cfg = TrainJobConfig.from_dict(config["cfg"], "<train_loop_config>")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    worker = WorkerInfo(rank, ctx.get_world_size(), device, ray_report(rank))
    SFTRecipe(cfg, Path(config["run_dir"]), int(config["n_rows"]), worker).run()
