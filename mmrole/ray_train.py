"""Ray Train (V2) + DeepSpeed shell around :mod:`mmrole.train`: the driver (:func:`run_training`) and the per-worker
loop (:func:`train_loop_per_worker`).

Driver: resolve the config, start/join Ray, build the streaming dataset, run a ``TorchTrainer`` with
``FailureConfig(max_failures)``, then merge rejects and print a summary (counts in/out/rejected, final model).

Worker: build the VLM, ``deepspeed.initialize`` on Ray's process group (``dist_init_required=False``), resume from
the newest committed checkpoint of the run if there is one, then train on ``get_dataset_shard("train")``.

Checkpoints (see :mod:`mmrole.train.checkpoint`): every rank writes DeepSpeed state into a ``.tmp-*`` directory
of the shared run directory, rank 0 adds the Hugging Face model and trainer state, marks it complete and renames
it; only then is it reported to Ray. What Ray gets is a small commit record (``commit.json``: step + path) kept
by Ray's own retention (num_to_keep=1); the heavy data is never copied by Ray, and its rotation is ours (the newest
complete checkpoint is never deleted). The run directory is ``output_dir/run_name`` and is also Ray Train's
experiment directory, so running the same command again with the same run name resumes the run.

Elastic runs (``scaling.min_workers``): Ray may restart the worker group with any size in [min, max]. Gradient
accumulation adapts so the global batch stays the same. ZeRO stages 1-3 partition optimizer state by rank, so a
restart at a *different* size resumes from the HF weights of the checkpoint with fresh Adam moments (the step,
LR schedule position and data position still carry over); at the same size the resume is exact.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import deepspeed  # noqa: F401  (imported here so a missing install fails at startup, not inside workers)
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from mmrole.train import checkpoint as ckpt
from mmrole.train.config import ConfigError, TrainJobConfig, batch_geometry, total_optimizer_steps
from mmrole.train.ds_config import build_deepspeed_config, resolve_precision, split_decay
from mmrole.train.metrics import MetricsSink, StepStats, progress_line, read_metrics
from mmrole.train.rejects import REJECTS_DIR, count_by_reason, merge_rejects
from mmrole.train.rows import batch_token_counts, decode_table
from mmrole.train.schedule import make_schedule

RAY_COMMIT_PREFIX = "ray_commit-"
COMMIT_RECORD = "commit.json"
FINAL_LINK = "final_model"
FINAL_RECORD = "final.json"


# ============================================================================================== worker side


def _say(msg: str) -> None:
    """Progress line from a worker. Ray Train V2 patches print() into its logger (which also echoes it), so write
    to stdout directly to get each line once."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _dist():
    import torch.distributed as dist

    return dist


def _broadcast(obj: Any, device: torch.device) -> Any:
    dist = _dist()
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def _allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _dist().all_reduce(t)
    return t.tolist()


def _barrier():
    _dist().barrier()


def _dtype_for(precision: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


def _build_model(cfg: TrainJobConfig, device: torch.device, precision: str, weights_from: Optional[Path]):
    from mmrole.models import build_vlm

    vcfg = copy.deepcopy(cfg.model)
    vcfg.device = str(device)
    vcfg.dtype = _dtype_for(precision)
    if weights_from is not None:
        # An elastic resize changed the world size: continue from the checkpoint's HF weights (an adapter dir for
        # LoRA, which build_vlm loads on top of its base as trainable).
        vcfg.model_path = str(weights_from)
        if vcfg.lora is not None:
            vcfg.lora = None
    vlm = build_vlm(vcfg)
    vlm.model.train()
    return vlm


def _optimizer(model, cfg: TrainJobConfig, device: torch.device):
    t = cfg.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, **kw), groups


def _save_hf(engine, vlm, out: Path, zero_stage: int, rank: int) -> None:
    """Hugging Face copy of the model (adapter only for LoRA). Under ZeRO-3 the parameters are partitioned:
    gather a consolidated state dict on rank 0 first (collective: every rank must call this)."""
    from mmrole.models.processor import save_processor

    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        kw = {"safe_serialization": True}
        if state_dict is not None:
            kw["state_dict"] = state_dict
        engine.module.save_pretrained(out, **kw)
        save_processor(vlm.processor, out)


@dataclass
class _Progress:
    step: int = 0
    epoch: int = 0
    epoch_rows_local: int = 0  # rows of the current epoch this worker has consumed
    samples_seen: int = 0
    last_saved: int = -1


def _save_checkpoint(
    engine,
    vlm,
    cfg: TrainJobConfig,
    run_dir: Path,
    prog: _Progress,
    token: str,
    rank: int,
    world: int,
    device: torch.device,
    total_steps: int,
    metrics: dict,
    sink,
) -> Path:
    """Write -> mark complete -> rename -> report to Ray -> rotate. Collective: all ranks call it."""
    t0 = time.time()
    epoch_rows = int(_allreduce_sum([prog.epoch_rows_local], device)[0])
    tmp = ckpt.tmp_dir(run_dir, prog.step, token)
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(tmp / ckpt.DS_DIR), tag=ckpt.DS_TAG, client_state={"mmrole_step": prog.step})
    _save_hf(engine, vlm, tmp / ckpt.HF_DIR, cfg.train.zero_stage, rank)
    state = {
        "step": prog.step,
        "epoch": prog.epoch,
        "epoch_rows": epoch_rows,
        "samples_seen": prog.samples_seen,
        "world_size": world,
        "zero_stage": cfg.train.zero_stage,
        "total_steps": total_steps,
        "kind": cfg.kind,
        "run_name": cfg.run_name,
        "base_model": cfg.model.model_path,
        "lora": cfg.model.lora is not None,
        "time": time.time(),
    }
    if rank == 0:
        ckpt.write_state(tmp, state)
    _barrier()  # every rank's optimizer partition is on disk before the commit
    final = None
    if rank == 0:
        final = ckpt.commit(tmp, prog.step, {"world_size": world})
    final = _broadcast(str(final) if final else None, device)
    _report(metrics | {"step": prog.step, "checkpoint": final}, Path(final), rank)
    if rank == 0:
        deleted = ckpt.apply_rotation(run_dir, cfg.checkpoint.num_to_keep, protect=[final])
        sink.event(
            "checkpoint",
            step=prog.step,
            path=final,
            seconds=round(time.time() - t0, 3),
            deleted=[p.name for p in deleted],
        )
        _say(f"[mmrole] checkpoint step {prog.step} committed: {final} ({time.time() - t0:.1f}s)")
    prog.last_saved = prog.step
    return Path(final)


def _report(metrics: dict, committed: Path, rank: int) -> None:
    """Report a committed checkpoint to Ray as a small commit record (rank 0); other ranks report no checkpoint."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="mmrole-commit-", ignore_cleanup_errors=True) as d:
        (Path(d) / COMMIT_RECORD).write_text(json.dumps({"step": metrics["step"], "path": str(committed)}))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"{RAY_COMMIT_PREFIX}{committed.name}-{uuid.uuid4().hex[:6]}",
        )


def _maybe_kill(cfg: TrainJobConfig, run_dir: Path, step: int, rank: int) -> None:
    """Fault injection (tests): SIGKILL this worker once per run directory."""
    d = cfg.debug
    if step not in d.kill_at_steps or rank != d.kill_rank:
        return
    marker = run_dir / f".fault_injected_step_{step}"
    if marker.exists():
        return
    marker.write_text(str(time.time()))
    _say(f"[mmrole] debug: killing rank {rank} (pid {os.getpid()}) after step {step}")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _iter_rows(shard, cfg: TrainJobConfig, epoch: int, rank: int, skip_rows: int):
    """Decoded micro-batches of one epoch (lists of per-sample dicts), skipping rows already trained on."""
    d = cfg.data
    it = shard.iter_batches(
        batch_size=cfg.train.micro_batch_size,
        batch_format="pyarrow",
        prefetch_batches=d.prefetch_batches,
        local_shuffle_buffer_size=d.local_shuffle_buffer or None,
        local_shuffle_seed=(d.shuffle_seed * 1_000_003 + epoch * 7919 + rank) if d.local_shuffle_buffer else None,
        drop_last=False,
    )
    skipped = 0
    for table in it:
        if skipped < skip_rows:
            take = min(table.num_rows, skip_rows - skipped)
            skipped += take
            if take == table.num_rows:
                continue
            table = table.slice(take)
        yield decode_table(table)


def train_loop_per_worker(config: dict) -> None:
    """The training loop run by every Ray Train worker."""
    from torch.optim.lr_scheduler import LambdaLR

    cfg = TrainJobConfig.from_dict(config["cfg"], "<train_loop_config>")
    run_dir = Path(config["run_dir"])
    n_rows = int(config["n_rows"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.train.precision, device.type)
    geo = batch_geometry(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
    total_steps = total_optimizer_steps(n_rows, cfg.train.epochs, geo, cfg.train.max_steps)
    schedule = make_schedule(
        total_steps, cfg.train.schedule, cfg.train.warmup_ratio, cfg.train.warmup_steps, cfg.train.min_lr_ratio
    )
    torch.manual_seed(cfg.train.seed)

    # Rank 0 decides (one directory scan) and tells the others, so every rank resumes from the same checkpoint.
    plan, attempt = _broadcast(
        (ckpt.plan_resume(run_dir, world, cfg.train.zero_stage), uuid.uuid4().hex[:10]) if rank == 0 else None, device
    )
    if rank == 0:
        # Leftovers of a crashed attempt (.tmp-* dirs) go now; committed checkpoints are kept.
        ckpt.apply_rotation(run_dir, cfg.checkpoint.num_to_keep, protect=[plan.checkpoint] if plan.checkpoint else [])
    _barrier()

    t_build = time.time()
    weights_from = plan.checkpoint / ckpt.HF_DIR if plan.mode == "weights" else None
    vlm = _build_model(cfg, device, precision, weights_from)
    trainable = vlm.num_parameters(trainable_only=True)  # before ZeRO-3 partitions the parameters
    opt, groups = _optimizer(vlm.model, cfg, device)
    ds_config = build_deepspeed_config(cfg.train, geo, device.type)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=vlm.model,
        optimizer=opt,
        model_parameters=groups if opt is None else None,
        # A plain function, not the schedule object: LambdaLR checkpoints the attributes of callable objects and
        # would restore the old schedule; this way a resumed run follows the current config's schedule.
        lr_scheduler=lambda o: LambdaLR(o, lambda step: schedule(step)),
        config=ds_config,
        dist_init_required=False,
    )
    if plan.mode == "exact":
        load_path, _ = engine.load_checkpoint(
            str(plan.checkpoint / ckpt.DS_DIR),
            tag=ckpt.DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise ckpt.CheckpointError(f"{plan.checkpoint}: DeepSpeed could not load its state")
    if plan.checkpoint is not None:
        # Continue the schedule at the resumed step with the configured peak LR (also after a weights-only resume).
        scheduler.base_lrs = [cfg.train.lr for _ in scheduler.base_lrs]
        scheduler.last_epoch = plan.step
        for group in scheduler.optimizer.param_groups:
            group["lr"] = cfg.train.lr * schedule(plan.step)
    build_s = time.time() - t_build

    prog = _Progress(step=plan.step, epoch=plan.epoch, samples_seen=plan.samples_seen, last_saved=plan.step)
    sink = MetricsSink(run_dir, attempt) if rank == 0 else None
    if rank == 0:
        info = dict(
            world_size=world,
            grad_accum=geo.grad_accum,
            global_batch=geo.global_batch_size,
            micro_batch=geo.micro_batch_size,
            total_steps=total_steps,
            precision=precision,
            zero_stage=cfg.train.zero_stage,
            device=str(device),
            model_build_s=round(build_s, 2),
            trainable_params=trainable,
            n_rows=n_rows,
        )
        if plan.checkpoint is not None:
            sink.event(
                "resume",
                from_step=plan.step,
                checkpoint=str(plan.checkpoint),
                mode=plan.mode,
                reason=plan.reason,
                **info,
            )
            _say(f"[mmrole] resuming from step {plan.step} ({plan.mode}) {plan.checkpoint} {plan.reason}".rstrip())
        else:
            sink.event("start", **info)
        if geo.global_batch_size != cfg.train.global_batch_size:
            _say(
                f"[mmrole] global batch {cfg.train.global_batch_size} is not a multiple of micro_batch x world "
                f"({geo.micro_batch_size} x {world}); using {geo.global_batch_size}"
            )
        _say(
            f"[mmrole] {world} worker(s), ZeRO-{cfg.train.zero_stage}, {precision}, micro {geo.micro_batch_size}"
            f" x accum {geo.grad_accum} x {world} = {geo.global_batch_size}/step, {total_steps} steps"
        )

    shard = ray.train.get_dataset_shard("train")
    skip_rows = plan.epoch_rows // world
    last_metrics: dict = {}
    # Per optimizer step: loss sum, micro-batches, samples, text, image, target tokens, data wait (local).
    acc = [0.0] * 7
    t_step = time.time()
    done = prog.step >= total_steps
    while not done and prog.epoch < cfg.train.epochs:
        prog.epoch_rows_local = skip_rows
        rows_it = _iter_rows(shard, cfg, prog.epoch, rank, skip_rows)
        while True:
            t0 = time.time()
            rows = next(rows_it, None)
            acc[6] += time.time() - t0
            if rows is None:
                break
            if not rows:
                continue
            batch = vlm.to_device(vlm.pad_batch(rows))
            batch.pop("id", None)
            loss = engine(**batch).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = optimizer.param_groups[0]["lr"]
            engine.step()
            text_t, img_t, tgt_t = batch_token_counts(rows)
            acc[0] += float(loss.detach().float().item())
            acc[1] += 1
            acc[2] += len(rows)
            acc[3] += text_t
            acc[4] += img_t
            acc[5] += tgt_t
            prog.epoch_rows_local += len(rows)
            if not boundary:
                continue
            prog.step += 1
            tot = _allreduce_sum(acc, device)
            prog.samples_seen += int(tot[2])
            gn = engine.get_global_grad_norm()
            stats = StepStats(
                step=prog.step,
                loss=tot[0] / max(tot[1], 1),
                lr=lr,
                samples=int(tot[2]),
                text_tokens=int(tot[3]),
                image_tokens=int(tot[4]),
                target_tokens=int(tot[5]),
                step_time_s=time.time() - t_step,
                data_wait_s=tot[6] / world,
                grad_norm=float(gn) if gn is not None else None,
                epoch=prog.epoch,
            )
            last_metrics = stats.as_dict()
            if rank == 0:
                sink.write(last_metrics)
                if prog.step % cfg.train.log_every == 0 or prog.step == total_steps:
                    _say("[mmrole] " + progress_line(last_metrics, total_steps))
            acc = [0.0] * 7
            _maybe_kill(cfg, run_dir, prog.step, rank)
            if prog.step % cfg.checkpoint.every_steps == 0 or prog.step >= total_steps:
                _save_checkpoint(
                    engine, vlm, cfg, run_dir, prog, attempt, rank, world, device, total_steps, last_metrics, sink
                )
            t_step = time.time()
            if prog.step >= total_steps:
                done = True
                break
        if done:
            break
        epoch_rows = int(_allreduce_sum([prog.epoch_rows_local], device)[0])
        if rank == 0:
            sink.event("epoch_end", epoch=prog.epoch, rows=epoch_rows, step=prog.step)
            _say(f"[mmrole] epoch {prog.epoch} done: {epoch_rows} rows trained on by {world} worker(s)")
        prog.epoch += 1
        skip_rows = 0
    if prog.step > prog.last_saved:  # data ran out before total_steps (e.g. rejects): keep the last state
        _save_checkpoint(engine, vlm, cfg, run_dir, prog, attempt, rank, world, device, total_steps, last_metrics, sink)
    elif prog.last_saved == plan.step and plan.checkpoint is not None and rank == 0:
        _say(f"[mmrole] nothing left to train: the run is complete at step {plan.step}")
    epoch_rows = int(_allreduce_sum([prog.epoch_rows_local], device)[0])
    if rank == 0:
        sink.event("end", step=prog.step, total_steps=total_steps, epoch=prog.epoch, epoch_rows=epoch_rows)
        sink.close()
    # Ray attaches metrics to the result only with a checkpoint; make sure a finished run has one.
    latest = ckpt.latest_complete(run_dir, verify_files=False)
    if not last_metrics and latest is not None:
        _report({"step": latest.step, "checkpoint": str(latest.path), "already_complete": True}, latest.path, rank)


# ============================================================================================== driver side


@dataclass
class TrainSummary:
    ok: bool
    run_dir: str
    final_step: int = 0
    final_checkpoint: Optional[str] = None
    final_model: Optional[str] = None
    counts: dict = field(default_factory=dict)
    wall_s: float = 0.0
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _check_paths_for_cluster(cfg: TrainJobConfig) -> None:
    """Under ``ray job submit`` the driver runs in a temporary copy of the working dir: relative output or data
    paths would point into it (lost when the job ends, and not shared with worker nodes)."""
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return
    for key, value in (("output_dir", cfg.output_dir), ("data.prepared", cfg.data.prepared)):
        if not os.path.isabs(os.path.expanduser(value)):
            raise ConfigError(
                f"{key}={value!r} is relative; under `ray job submit` use an absolute path on storage "
                "shared by all nodes (e.g. output_dir=/mnt/shared/runs)"
            )


def _prepare_env(cfg: TrainJobConfig) -> None:
    # Set before Ray starts so the embedded cluster's workers inherit them (mmrole.ray_env.project_env_vars).
    from mmrole.ray_env import default_torch_extensions_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _init_ray(cfg: TrainJobConfig) -> None:
    if ray.is_initialized():
        return
    from mmrole.ray_env import init_ray

    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)


class EmbeddedTorchTrainer(TorchTrainer):
    """TorchTrainer minus Ray 2.60's PlacementGroupCleaner, for an embedded local Ray.

    The cleaner asks the State API (served by the dashboard) whether the train controller is alive and removes the
    run's placement group when the answer is "not found". Without a dashboard (our embedded Ray) or with several
    local Ray instances on one machine (it then queries whichever started last), the answer is wrong and it kills
    healthy workers mid-run, burning a max_failures retry. The controller removes its placement group itself on
    every normal or failed shutdown; the cleaner only matters if the controller process dies, which on an
    embedded Ray means the driver died and Ray goes with it."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]


def _prune_commit_records(run_dir: Path) -> list[str]:
    """Delete Ray commit records (``ray_commit-*``) that Ray's run snapshot does not reference. Driver only, when no
    trainer is running. Ray registers reports asynchronously, so a report made just before a worker died can be
    persisted but never registered (and then never deleted by Ray's retention)."""
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as name
    except ImportError:  # another Ray layout: leave everything alone
        return []
    snap = run_dir / name
    refs: set[str] = set()
    if snap.is_file():
        try:
            d = json.loads(snap.read_text())
            refs = {r["checkpoint_dir_name"] for r in d.get("checkpoint_results", [])}
            if d.get("latest_checkpoint_result"):
                refs.add(d["latest_checkpoint_result"]["checkpoint_dir_name"])
        except (OSError, ValueError, KeyError, TypeError):
            return []
    removed = []
    for p in run_dir.glob(RAY_COMMIT_PREFIX + "*"):
        if p.is_dir() and p.name not in refs:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _write_final(run_dir: Path, final: ckpt.CheckpointEntry) -> Path:
    """``<run_dir>/final_model`` -> the last committed checkpoint's HF model, plus final.json."""
    hf = final.path / ckpt.HF_DIR
    link = run_dir / FINAL_LINK
    tmp_link = run_dir / (FINAL_LINK + ".tmp")
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(os.path.relpath(hf, run_dir))
    os.replace(tmp_link, link)
    (run_dir / FINAL_RECORD).write_text(
        json.dumps({"step": final.step, "checkpoint": str(final.path), "hf_model": str(hf)}, indent=2)
    )
    return link


def run_training(cfg: TrainJobConfig, *, quiet: bool = False) -> TrainSummary:
    """Train per ``cfg`` on an embedded local Ray (or the cluster at ``ray.address`` / $RAY_ADDRESS)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from mmrole import ray_data_ingest as ingest

    t_start = time.time()
    _check_paths_for_cluster(cfg)
    _prepare_env(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print("[mmrole] resolved config:\n" + cfg.to_yaml(), flush=True)
    prev = run_dir / "config.yaml"
    if prev.is_file() and prev.read_text() != cfg.to_yaml():
        (run_dir / f"config.{int(time.time())}.yaml").write_text(prev.read_text())
        print(
            f"[mmrole] note: {prev} differs from this config (previous copy kept); resuming the run with the "
            "new settings",
            flush=True,
        )
    prev.write_text(cfg.to_yaml())

    if cfg.tiny_model and not (Path(cfg.model.model_path) / "config.json").is_file():
        from mmrole.models import make_tiny_vlm

        make_tiny_vlm(cfg.model.model_path, family=cfg.tiny_model, seed=cfg.train.seed)
        print(f"[mmrole] created a random-weight tiny {cfg.tiny_model} model at {cfg.model.model_path}", flush=True)

    source = ingest.resolve_source(cfg.data.prepared, cfg.split, cfg.data.max_rows)
    geo = batch_geometry(cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.scaling.num_workers)
    if total_optimizer_steps(source.n_rows, cfg.train.epochs, geo, cfg.train.max_steps) == 0:
        raise ValueError(
            f"{cfg.data.prepared} [{cfg.split}]: {source.n_rows} rows make no optimizer step with a "
            f"global batch of {geo.global_batch_size}; lower train.global_batch_size or add data"
        )
    embedded = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    _init_ray(cfg)
    ingest.configure_data_context(progress_bars=sys.stderr.isatty())
    dataset = ingest.build_dataset(
        source,
        cfg.model.to_dict(),
        str(run_dir / REJECTS_DIR),
        max_rows=cfg.data.max_rows,
        shuffle_seed=cfg.data.shuffle_seed,
        encode_batch_size=cfg.data.encode_batch_size,
        encode_concurrency=tuple(cfg.data.encode_concurrency),
        encode_num_cpus=cfg.data.encode_num_cpus,
    )
    if cfg.data.cache_encoded:
        dataset = dataset.materialize()

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    num_workers = (
        (s.min_workers, s.num_workers) if s.min_workers is not None and s.min_workers < s.num_workers else s.num_workers
    )
    trainer = (EmbeddedTorchTrainer if embedded else TorchTrainer)(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), "n_rows": source.n_rows},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=s.max_failures),
            # Ray keeps only the newest commit record; heavy checkpoint rotation is ours (mmrole.train.checkpoint).
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": dataset},
    )
    error = None
    _prune_commit_records(run_dir)
    try:
        trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: summarise what was committed, then fail
        error = f"{type(e).__name__}: {e}"
    _prune_commit_records(run_dir)
    rejects = merge_rejects(run_dir)
    rejected_ids = {r["id"] for r in rejects}
    records = read_metrics(run_dir)
    # Rows trained on in the last epoch that ran (shards are equal, so up to world-1 rows are left out).
    last_rows = None
    for r in records:
        if r.get("event") == "epoch_end":
            last_rows = r["rows"]
        elif r.get("event") == "end" and r.get("epoch_rows"):
            last_rows = r["epoch_rows"]
    final = ckpt.latest_complete(run_dir)
    counts = {
        "in": source.n_rows,
        "rejected": len(rejected_ids),
        "out": source.n_rows - len(rejected_ids),
        "rejected_by_stage": count_by_reason(rejects),
        "rows_trained_last_epoch": last_rows,
    }
    summary = TrainSummary(
        ok=error is None,
        run_dir=str(run_dir),
        final_step=final.step if final else 0,
        final_checkpoint=str(final.path) if final else None,
        counts=counts,
        wall_s=round(time.time() - t_start, 2),
        error=error,
    )
    if final is not None and error is None:
        summary.final_model = str(_write_final(run_dir, final))
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    print(
        f"[mmrole] data: in {counts['in']}, out {counts['out']}, rejected {counts['rejected']} "
        f"{counts['rejected_by_stage'] or ''} (rejects: {run_dir / 'rejects.jsonl'})".rstrip(),
        flush=True,
    )
    if error:
        print(f"[mmrole] training FAILED: {error}", file=sys.stderr, flush=True)
        if final is not None:
            print(
                f"[mmrole] last committed checkpoint: {final.path} (step {final.step}); re-run the same "
                "command to resume",
                file=sys.stderr,
                flush=True,
            )
    else:
        print(
            f"[mmrole] done in {summary.wall_s:.1f}s: step {summary.final_step}, model {summary.final_model}",
            flush=True,
        )
    return summary
