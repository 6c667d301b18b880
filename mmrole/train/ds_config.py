"""The DeepSpeed config of a run, built from :class:`TrainSettings` (pure: returns a dict)."""

from __future__ import annotations

from collections.abc import Iterable

from .config import BatchGeometry, TrainSettings

BUCKET = int(5e8)


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` = bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and DeepSpeed's CPU path is tested in fp32)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device_type != "cuda":
        raise ValueError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on CPU")
    return precision


def zero_section(stage: int, offload_optimizer: bool, device_type: str) -> dict:
    z: dict = {"stage": stage}
    if stage >= 1:
        # overlap_comm only pays off with CUDA streams; on CPU/gloo it just adds buffers.
        z.update(
            contiguous_gradients=True,
            overlap_comm=device_type == "cuda",
            reduce_bucket_size=BUCKET,
            allgather_bucket_size=BUCKET,
        )
    if stage == 3:
        # Needed to write a consolidated Hugging Face model from partitioned parameters at checkpoint time.
        z["stage3_gather_16bit_weights_on_model_save"] = True
        z.pop("allgather_bucket_size")
    if offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return z


def build_deepspeed_config(t: TrainSettings, geo: BatchGeometry, device_type: str) -> dict:
    """DeepSpeed config for ``geo`` (world size, micro-batch, accumulation) on ``cuda`` or ``cpu``.

    The optimizer is normally a client ``torch.optim.AdamW`` passed to ``deepspeed.initialize`` (no JIT-built
    fused/CPU Adam needed); with ``offload_optimizer`` DeepSpeed must own it (DeepSpeedCPUAdam), so it is declared
    here instead. The LR schedule is always a client scheduler (see :mod:`mmrole.train.schedule`)."""
    precision = resolve_precision(t.precision, device_type)
    cfg: dict = {
        "train_micro_batch_size_per_gpu": geo.micro_batch_size,
        "gradient_accumulation_steps": geo.grad_accum,
        "train_batch_size": geo.global_batch_size,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero_section(t.zero_stage, t.offload_optimizer, device_type),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # progress comes from our own metrics, not DeepSpeed's logger
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # client torch AdamW under ZeRO
    }
    if precision == "bf16" and t.zero_stage >= 1 and t.grad_accum_dtype == "fp32":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}  # (ZeRO-0 cannot mix dtypes: it keeps bf16)
    if t.offload_optimizer:
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay},
        }
    return cfg


def no_weight_decay(name: str, ndim: int) -> bool:
    """Biases, norm weights and other 1-D parameters are not decayed (standard AdamW practice)."""
    return ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def split_decay(named_shapes: Iterable[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without) for trainable parameters given as (name, ndim)."""
    decay, no_decay = [], []
    for name, ndim in named_shapes:
        (no_decay if no_weight_decay(name, ndim) else decay).append(name)
    return decay, no_decay
