"""Typed training-job configs (built by the one config system, :mod:`mmrole.config`). No torch, Ray or DeepSpeed."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mmrole.config import ConfigError, build_dataclass, load_config_file, path_field
from mmrole.models.config import VLMConfig

KINDS = ("agent", "reward_model")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
REPORT_TO = ("tensorboard", "mlflow", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_SPLIT = {"agent": "train", "reward_model": "rm_train"}
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class DataSettings:
    """Where the prepared shards are and how the Ray Data pipeline encodes and shuffles them."""

    prepared: str = path_field("input", default="")  # output folder of `mmrole data prepare` (holds manifest.json)
    split: str = ""  # "" = train for the agent, rm_train for the reward model
    max_rows: Optional[int] = None  # use only the first N rows in manifest order (the same rows every epoch)
    shuffle_seed: int = 0  # an epoch's row order is a pure function of (shuffle_seed, epoch)
    # Ray Data encoder actors per train worker (CPU: row reads, image decoding, processor); 0 = encode in a thread of
    # the worker (no Ray Data).
    encode_actors: int = 1
    encode_num_cpus: float = 1.0  # logical CPUs per encoder actor (fractional on small machines)
    prefetch_batches: int = 2  # micro-batches requested ahead by each train worker (at least one step's worth)
    # Object store memory each train worker's pipeline may fill with encoded micro-batches ahead of training (MiB;
    # null = Ray Data's default, a share of the whole cluster's object store, claimed by every worker alike).
    prefetch_memory_mb: Optional[int] = 2048
    # Encoder actors on the train worker's own node (encoded tensors stay local); false = anywhere in the cluster
    # (e.g. on CPU-only nodes).
    encode_on_worker_node: bool = True
    # Fail fast: rows encoded on the driver before Ray starts (token-length figures; a run whose first rows are
    # all rejected stops here), and the largest share of rejected rows a run may have and still be "ok".
    preflight_rows: int = 256
    # Pack each micro-batch's samples into rows of at most model.max_length tokens (no attention across samples);
    # null = on where the model family supports it (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), true = required.
    packing: Optional[bool] = None
    # Validation: the last ``eval_rows`` of the selected rows are held out of training and give an eval loss every
    # train.eval_every steps and at the end (0 = no validation).
    eval_rows: int = 0
    max_reject_ratio: float = 0.05


@dataclass
class TrainSettings:
    """Optimisation: batch geometry, AdamW, clipping, LR schedule, ZeRO stage and precision."""

    epochs: int = 3
    max_steps: Optional[int] = None  # stop after this many optimizer steps (default: the epochs)
    global_batch_size: int = 256  # samples per optimizer step, over all workers and accumulation
    micro_batch_size: int = 1  # samples per forward pass per worker
    lr: float = 1e-5
    weight_decay: float = 0.05  # not applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    schedule: str = "cosine"  # cosine | constant (both after a linear warmup)
    warmup_ratio: float = 0.03  # of the total optimizer steps ...
    warmup_steps: Optional[int] = None  # ... unless given in steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    # Gradient accumulation dtype for bf16 runs: fp32 (DeepSpeed data_types.grad_accum_dtype; ZeRO-1/3 accumulate
    # in fp32; ZeRO-2 in DeepSpeed 0.19 reduces in the model dtype into fp32 partitions) or "model" (bf16).
    grad_accum_dtype: str = "fp32"
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory (DeepSpeedCPUAdam; JIT-builds cpu_adam)
    seed: int = 0
    log_every: int = 1  # optimizer steps between progress lines (metrics.jsonl gets every step)
    eval_every: int = 0  # optimizer steps between validation losses (0 = at the end only); needs data.eval_rows


@dataclass
class CheckpointSettings:
    every_steps: int = 500  # optimizer steps between committed checkpoints (the last step is always saved)
    num_to_keep: int = 2  # committed checkpoints kept; the newest complete one is never deleted


@dataclass
class ScalingSettings:
    num_workers: int = 1  # train workers (max workers when elastic)
    min_workers: Optional[int] = None  # set (< num_workers) for an elastic ScalingConfig((min, max))
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractional CPUs avoid starving Ray Data on small machines
    gpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the run fails


@dataclass
class RaySettings:
    address: Optional[str] = None  # None: $RAY_ADDRESS, else an embedded local Ray
    num_cpus: Optional[int] = None  # logical CPUs of the embedded local Ray (default max(4, cores))


@dataclass
class DebugSettings:
    """Fault injection for tests: SIGKILL worker ``kill_rank`` right after each optimizer step listed in
    ``kill_at_steps`` (before that step's checkpoint), once per step and run directory."""

    kill_at_steps: list[int] = field(default_factory=list)
    kill_rank: int = 0
    record_rows: bool = False  # each rank appends the row ids of every step to <run_dir>/row_log/rank<r>.jsonl


@dataclass
class TrackingSettings:
    """Experiment trackers named in ``report_to`` (metrics.jsonl is always written)."""

    experiment: str = "mmrole"  # MLflow experiment name; the W&B project when wandb_project is empty
    mlflow_tracking_uri: str = ""  # "" = a local MLflow file store in <run_dir>/mlruns (no server needed)
    wandb_project: str = ""
    wandb_entity: Optional[str] = None
    wandb_mode: str = "auto"  # auto = online if WANDB_API_KEY is set, else offline (files in <run_dir>/wandb)


@dataclass
class TrainJobConfig:
    """A whole training job (agent or reward model)."""

    run_name: str
    model: VLMConfig
    data: DataSettings
    kind: str = "agent"  # agent | reward_model
    output_dir: str = path_field(
        "output", default="runs"
    )  # storage path: the run lives in output_dir/run_name (shared FS on a cluster)
    tiny_model: Optional[str] = None  # create a random-weight tiny model of this family at model.model_path if absent
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    debug: DebugSettings = field(default_factory=DebugSettings)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of tensorboard, mlflow, wandb
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    def __post_init__(self):
        validate(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.run_name

    @property
    def split(self) -> str:
        return self.data.split or DEFAULT_SPLIT[self.kind]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> TrainJobConfig:
        return build_dataclass(cls, d, source, "")


def validate(c: TrainJobConfig) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    t, s = c.train, c.scaling

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(c.kind in KINDS, "kind", f"must be one of {KINDS}, got {c.kind!r}")
    need(
        bool(_RUN_NAME.match(c.run_name or "")),
        "run_name",
        f"{c.run_name!r} must be a plain name (letters, digits, . _ -), it names the run directory",
    )
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    need(t.global_batch_size >= t.micro_batch_size, "train.global_batch_size", "must be >= micro_batch_size")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    need(t.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    need(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", "must be 0, 1, 2 or 3")
    need(t.grad_accum_dtype in ("fp32", "model"), "train.grad_accum_dtype", "must be fp32 or model")
    need(t.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
    need(not (t.offload_optimizer and t.zero_stage == 0), "train.offload_optimizer", "needs zero_stage >= 1")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(c.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    need(
        c.checkpoint.num_to_keep >= 1,
        "checkpoint.num_to_keep",
        "must be >= 1 (a run always keeps its newest complete checkpoint)",
    )
    need(
        all(r in REPORT_TO for r in c.report_to) and len(set(c.report_to)) == len(c.report_to),
        "report_to",
        f"must be a list of distinct trackers from {REPORT_TO}, got {c.report_to!r}",
    )
    need(c.tracking.wandb_mode in WANDB_MODES, "tracking.wandb_mode", f"must be one of {WANDB_MODES}")
    need(bool(c.tracking.experiment), "tracking.experiment", "must not be empty")
    need(s.num_workers >= 1, "scaling.num_workers", "must be >= 1")
    need(
        s.min_workers is None or 1 <= s.min_workers <= s.num_workers,
        "scaling.min_workers",
        "must be in [1, num_workers] or null",
    )
    need(s.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
    need(s.max_failures >= -1, "scaling.max_failures", "must be >= -1 (-1 = unlimited)")
    need(c.data.encode_actors >= 0, "data.encode_actors", "must be >= 0 (0 = encode in the worker)")
    need(c.data.encode_num_cpus > 0, "data.encode_num_cpus", "must be > 0")
    need(c.data.prefetch_batches >= 1, "data.prefetch_batches", "must be >= 1")
    need(
        c.data.prefetch_memory_mb is None or c.data.prefetch_memory_mb >= 1,
        "data.prefetch_memory_mb",
        "must be >= 1 or null",
    )
    need(c.data.eval_rows >= 0, "data.eval_rows", "must be >= 0")
    need(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    need(c.data.preflight_rows >= 0, "data.preflight_rows", "must be >= 0")
    need(0 <= c.data.max_reject_ratio <= 1, "data.max_reject_ratio", "must be in [0, 1]")
    need(c.data.max_rows is None or c.data.max_rows >= 1, "data.max_rows", "must be >= 1 or null")
    for world in range(s.min_workers or s.num_workers, s.num_workers + 1):
        batch_geometry(t.global_batch_size, t.micro_batch_size, world)  # raises naming the sizes that fit
    need(bool(c.data.prepared), "data.prepared", "is required (the output folder of `mmrole data prepare`)")
    need(bool(c.model.model_path), "model.model_path", "is required")
    need(
        c.tiny_model is None or c.tiny_model in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
        "tiny_model",
        "must be qwen2_vl, qwen2_5_vl, qwen3_vl or null",
    )


def load_config(
    path: Optional[str | Path], overrides: Optional[list[str]] = None, defaults: Optional[dict] = None
) -> TrainJobConfig:
    """Read a YAML config (or start from ``defaults``), apply ``key=value`` overrides, build and validate."""
    return load_config_file(TrainJobConfig, path, overrides, defaults)


# ----------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class BatchGeometry:
    """How a global batch is made from micro-batches on ``world_size`` workers."""

    world_size: int
    micro_batch_size: int
    grad_accum: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum


def batch_geometry(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchGeometry:
    """Gradient accumulation that gives exactly ``global_batch_size`` samples per optimizer step.

    When the world size changes (elastic runs), accumulation adapts so the optimisation is the same. A global batch
    that ``micro_batch_size x world_size`` does not divide is refused with the nearest sizes that would fit."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        lower = global_batch_size // per_step * per_step
        fits = [n for n in (lower, lower + per_step) if n > 0]
        raise ConfigError(
            f"train.global_batch_size: {global_batch_size} is not a multiple of micro_batch_size x workers = "
            f"{micro_batch_size} x {world_size} = {per_step}; use {' or '.join(map(str, fits))} (or change "
            "train.micro_batch_size / scaling.num_workers / scaling.min_workers)"
        )
    return BatchGeometry(world_size, micro_batch_size, global_batch_size // per_step)


def total_optimizer_steps(n_rows: int, epochs: int, geo: BatchGeometry, max_steps: Optional[int] = None) -> int:
    """Optimizer steps of a run: equal shards of ``n_rows // world`` rows per worker, micro-batches carried across
    epoch ends (an accumulation group may straddle two epochs), the last partial group dropped."""
    rows_per_worker = n_rows // geo.world_size
    micro_per_epoch = -(-rows_per_worker // geo.micro_batch_size)
    steps = (epochs * micro_per_epoch) // geo.grad_accum
    if max_steps is not None:
        steps = min(steps, max_steps)
    return max(steps, 0)
