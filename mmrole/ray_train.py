"""Ray Train (V2) + DeepSpeed driver (:func:`run_training`); the per-worker recipe is :mod:`mmrole.ray_train_recipe`.

Driver: resolve the config, encode the first rows (token lengths; refuse a run whose rows are rejected), start/join
Ray, run a ``TorchTrainer`` with ``FailureConfig(max_failures)``, then merge rejects and write a summary (counts
in/out/rejected, final model; ``ok`` only when steps were trained and rejects stay under the cap).

Worker: build the VLM, ``deepspeed.initialize`` on Ray's process group (``dist_init_required=False``), resume from
the newest committed checkpoint of the run if there is one, then train on the rank's fixed share of each epoch's
row order (:mod:`mmrole.train.data_order`), encoded by CPU actors the worker owns.

Checkpoints (see :mod:`mmrole.train.checkpoint`): every rank writes DeepSpeed state into a ``.tmp-*`` directory
of the shared run directory, rank 0 adds the Hugging Face model and trainer state, marks it complete and renames
it; only then is it reported to Ray. What Ray gets is a small commit record (``commit.json``: step + path) kept
by Ray's own retention (num_to_keep=1); the heavy data is never copied by Ray, and its rotation is ours (the newest
complete checkpoint is never deleted). The run directory is ``output_dir/run_name`` and is also Ray Train's
experiment directory, so running the same command again with the same run name resumes the run.

Elastic runs (``scaling.min_workers``): Ray may restart the worker group with any size in [min, max]. Gradient
accumulation adapts so the global batch stays the same. ZeRO stages 1-3 partition optimizer state by rank, so a
restart at a *different* size resumes from the HF weights of the checkpoint with fresh Adam moments (the step,
LR schedule position and data position still carry over); at the same size the resume is exact. The data position
is a prefix of the epoch's row order, so a resize never trains a row twice in that epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import deepspeed  # noqa: F401  (imported here so a missing install fails at startup, not inside workers)
import ray
from ray.train.torch import TorchTrainer

from mmrole.ray_recipe_checkpoint import RAY_COMMIT_PREFIX
from mmrole.ray_train_recipe import train_loop_per_worker
from mmrole.train import checkpoint as ckpt
from mmrole.train.config import ConfigError, TrainJobConfig, batch_geometry, total_optimizer_steps
from mmrole.train.metrics import read_metrics
from mmrole.train.preflight import PreflightError, check_preflight, reject_verdict
from mmrole.train.rejects import count_by_reason, merge_rejects

FINAL_LINK = "final_model"
FINAL_RECORD = "final.json"


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
    eval_loss: Optional[float] = None  # validation loss at the end (data.eval_rows)

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


def _init_ray(cfg: TrainJobConfig, log_to_driver: bool = True) -> None:
    if ray.is_initialized():
        return
    from mmrole.ray_env import init_ray

    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, log_to_driver=log_to_driver)


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


def _preflight(cfg: TrainJobConfig, n_rows: int) -> None:
    """Measure the first ``data.preflight_rows`` rows on the driver: print their token lengths (as ``mmrole data
    lengths`` does) and refuse the run when they are all (or more than the reject cap) rejected, before any row
    reaches Ray."""
    from mmrole.train.lengths import format_length_report, measure_lengths

    n = min(cfg.data.preflight_rows, n_rows)
    if n == 0:
        return
    t0 = time.time()
    rep = measure_lengths(cfg.data.prepared, cfg.model, split=cfg.split, limit=n)
    for line in format_length_report(rep, [cfg.model.max_length]).splitlines():
        print(f"[mmrole] {line}", flush=True)
    print(f"[mmrole] first {n} rows checked in {time.time() - t0:.1f}s", flush=True)
    check_preflight(rep, cfg.model.max_length, cfg.data.max_reject_ratio)


def memory_estimate(cfg: TrainJobConfig, gpus_per_node: int = 8) -> str:
    """DeepSpeed's per-GPU estimate of model-state memory (params, grads, Adam) for this model, ZeRO stage and
    world size; the model is built on the meta device (no weights read)."""
    import contextlib
    import io

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmrole.models.processor import resolve_model_paths

    base = resolve_model_paths(cfg.model.model_path)[1]
    hf_cfg = AutoConfig.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_cfg, trust_remote_code=cfg.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    world = cfg.scaling.num_workers
    per_node = min(world, gpus_per_node)
    nodes = -(-world // per_node)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if cfg.train.zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

            estimate_zero3_model_states_mem_needs_all_cold(total, largest, per_node, nodes)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

            estimate_zero2_model_states_mem_needs_all_cold(total, per_node, nodes)
    return out.getvalue().strip()


def _fail(run_dir: Path, t_start: float, counts: dict, error: str) -> TrainSummary:
    summary = TrainSummary(ok=False, run_dir=str(run_dir), counts=counts, wall_s=round(time.time() - t_start, 2))
    summary.error = error
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    print(f"[mmrole] training FAILED: {error}", file=sys.stderr, flush=True)
    return summary


def run_training(
    cfg: TrainJobConfig,
    *,
    quiet: bool = False,
    verbose: bool = True,
    train_loop: Callable[[dict], None] = train_loop_per_worker,
    verdict: Optional[Callable[[Path], tuple[Optional[str], dict]]] = None,
) -> TrainSummary:
    """Train per ``cfg`` on an embedded local Ray (or the cluster at ``ray.address`` / $RAY_ADDRESS).

    ``train_loop``: what each Ray Train worker runs (default: the SFT recipe; the RL recipes pass their own).
    ``verdict(run_dir) -> (error or None, extra counts)``: the recipe's own check of a finished run (e.g. GRPO's
    failed-reward share); an error makes the run ``"ok": false``. A ``stopped`` event in metrics.jsonl (a recipe
    ended the run early) always does.

    ``quiet``: do not print the resolved config. ``verbose=False``: Ray/DeepSpeed/transformers output and the
    workers' lines go to Ray's log files; the console gets our own lines and a progress bar."""
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
    n_train = source.n_rows - cfg.data.eval_rows
    if n_train < 1:
        raise ConfigError(f"data.eval_rows: {cfg.data.eval_rows} leaves no rows to train on ({source.n_rows} selected)")
    geo = batch_geometry(cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.scaling.num_workers)
    if total_optimizer_steps(n_train, cfg.train.epochs, geo, cfg.train.max_steps) == 0:
        raise ValueError(
            f"{cfg.data.prepared} [{cfg.split}]: {source.n_rows} rows make no optimizer step with a "
            f"global batch of {geo.global_batch_size}; lower train.global_batch_size or add data"
        )
    from mmrole.models.processor import resolve_family, resolve_model_paths
    from mmrole.train.packing import pack_samples

    family = resolve_family(resolve_model_paths(cfg.model.model_path)[1], cfg.model.family, cfg.model.trust_remote_code)
    print(f"[mmrole] packing: {'on' if pack_samples(cfg, family) else 'off'} ({family})", flush=True)
    if cfg.scaling.use_gpu:
        print("[mmrole] DeepSpeed memory estimate:\n" + memory_estimate(cfg), flush=True)
    try:
        _preflight(cfg, source.n_rows)
    except PreflightError as e:
        return _fail(run_dir, t_start, {"in": source.n_rows}, str(e))
    embedded = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not verbose:
        from mmrole.console import setup_console

        setup_console(verbose)
    _init_ray(cfg, log_to_driver=verbose)
    if not verbose:
        print("[mmrole] worker output: Ray's session logs (e.g. /tmp/ray/session_latest/logs); --verbose shows it")

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    num_workers = (
        (s.min_workers, s.num_workers) if s.min_workers is not None and s.min_workers < s.num_workers else s.num_workers
    )
    trainer = (EmbeddedTorchTrainer if embedded else TorchTrainer)(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), "n_rows": n_train},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=s.max_failures),
            # Ray keeps only the newest commit record; heavy checkpoint rotation is ours (mmrole.train.checkpoint).
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    error = None
    _prune_commit_records(run_dir)
    from mmrole.train.progress import MetricsFollower

    try:
        if verbose:
            trainer.fit()
        else:
            with MetricsFollower(run_dir):
                trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: summarise what was committed, then fail
        error = f"{type(e).__name__}: {e}"
    _prune_commit_records(run_dir)
    rejects = merge_rejects(run_dir)
    rejected_ids = {r["id"] for r in rejects}
    by_stage = count_by_reason(rejects)
    final = ckpt.latest_complete(run_dir)
    counts = {
        "in": source.n_rows,
        "rejected": len(rejected_ids),
        "out": source.n_rows - len(rejected_ids),
        "rejected_by_stage": by_stage,
        "samples_trained": _samples_trained(read_metrics(run_dir)),
    }
    if error is None:
        error = reject_verdict(final.step if final else 0, source.n_rows, by_stage, cfg.data.max_reject_ratio)
    if verdict is not None:
        extra_error, extra_counts = verdict(run_dir)
        counts.update(extra_counts)
        error = error or extra_error
    stopped = _stopped_events(read_metrics(run_dir))
    if error is None and stopped:
        error = f"stopped at step {stopped[-1].get('step')}: {stopped[-1].get('reason')}"
    evals = [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r]
    summary = TrainSummary(
        eval_loss=evals[-1] if evals else None,
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


def _stopped_events(records: list[dict]) -> list[dict]:
    """``stopped`` events of the last attempt (after its start or resume event): a rerun that got further is not
    failed by an earlier attempt's stop."""
    starts = [i for i, r in enumerate(records) if r.get("event") in ("start", "resume")]
    return [r for r in records[starts[-1] if starts else 0 :] if r.get("event") == "stopped"]


def _samples_trained(records: list[dict]) -> int:
    """Samples in the optimizer steps of the run (each step counted once, from its last attempt)."""
    last: dict[int, int] = {}
    for r in records:
        if "event" not in r and "loss" in r:
            last[r["step"]] = r.get("samples", 0)
    return sum(last.values())
