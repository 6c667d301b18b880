"""Model and DeepSpeed engine set-up for the training recipes: the VLM, its optimizer and LR schedule, the
DeepSpeed engine on Ray Train's process group, loading a checkpoint's state, and writing the Hugging Face copy.

Every recipe (SFT, DPO, GRPO) trains one such engine; :func:`build_frozen_vlm` gives the frozen models some
recipes compare against (a reference policy)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist

from mmrole.models.config import VLMConfig
from mmrole.train import checkpoint as ckpt
from mmrole.train.config import BatchGeometry, TrainJobConfig
from mmrole.train.ds_config import build_deepspeed_config, split_decay

MODEL_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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


def vlm_config_for(model: VLMConfig, device: torch.device, precision: str, weights_from: Optional[Path]) -> VLMConfig:
    """The model settings of a worker: its device and the run's precision; after an elastic resize, the checkpoint's
    HF weights (an adapter dir for LoRA, loaded on top of its base as trainable)."""
    vcfg = copy.deepcopy(model)
    vcfg.device = str(device)
    vcfg.dtype = MODEL_DTYPES[precision]
    if weights_from is not None:
        vcfg.model_path = str(weights_from)
        vcfg.lora = None
    return vcfg


def build_frozen_vlm(model: VLMConfig, device: torch.device, precision: str):
    """A model that is not trained (e.g. the reference policy): eval mode, no gradients."""
    from mmrole.models import build_vlm

    vlm = build_vlm(vlm_config_for(model, device, precision, None))
    vlm.model.eval()
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    return vlm


def adamw_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: with weight decay, and without (biases, norm weights)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters (everything frozen?)")
    decay, no_decay = split_decay((n, p.ndim) for n, p in named)
    by_name = dict(named)
    groups = [
        {"params": [by_name[n] for n in decay], "weight_decay": weight_decay},
        {"params": [by_name[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@dataclass
class TrainEngine:
    """A worker's trained model: the VLM (processor, encoder, family), the DeepSpeed engine wrapping it, and the
    optimizer and LR scheduler the engine steps."""

    vlm: Any
    engine: Any
    optimizer: Any
    scheduler: Any
    zero_stage: int
    rank: int
    trainable_params: int
    partitioned_at_build: bool  # ZeRO-3 built every parameter partitioned (zero.Init)
    hf_ds_config: Any = None  # transformers' DeepSpeed integration, referenced while the run lasts (ZeRO-3)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> Optional[float]:
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else None

    def load(self, plan: ckpt.ResumePlan, lr: float, schedule: Callable[[int], float]) -> None:
        """Continue from ``plan``: DeepSpeed's own state for an exact resume; in every resume the LR schedule at the
        resumed step with the configured peak ``lr`` (also after a weights-only resume)."""
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
            self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
            self.scheduler.last_epoch = plan.step
            for group in self.scheduler.optimizer.param_groups:
                group["lr"] = lr * schedule(plan.step)

    def save(self, out: Path, step: int) -> None:
        """DeepSpeed state (every rank its partition) and the Hugging Face copy under ``out``. Collective."""
        self.engine.save_checkpoint(str(out / ckpt.DS_DIR), tag=ckpt.DS_TAG, client_state={"mmrole_step": step})
        self.save_hf(out / ckpt.HF_DIR)

    def save_hf(self, out: Path) -> None:
        """Hugging Face copy of the model (adapter only for LoRA). Under ZeRO-3 the parameters are partitioned and
        are gathered module by module first (collective: every rank calls this)."""
        from mmrole.models.processor import save_processor

        state_dict = gather_full_state_dict(self.engine.module, self.rank) if self.zero_stage == 3 else None
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

    def close(self) -> None:
        if self.hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self.hf_ds_config = None


def build_train_engine(
    cfg: TrainJobConfig,
    device: torch.device,
    precision: str,
    geo: BatchGeometry,
    schedule: Callable[[int], float],
    rank: int,
    weights_from: Optional[Path] = None,
) -> TrainEngine:
    """The VLM of ``cfg.model`` wrapped by ``deepspeed.initialize`` on Ray Train's process group
    (``dist_init_required=False``), with AdamW (or DeepSpeed's CPU Adam when the optimizer is offloaded) and the
    warmup + cosine/constant schedule. Under ZeRO-3 the model is built partitioned (``zero.Init``)."""
    from torch.optim.lr_scheduler import LambdaLR

    from mmrole.models import build_vlm

    t = cfg.train
    ds_config = build_deepspeed_config(t, geo, device.type)
    hf_ds_config = None
    if t.zero_stage == 3:
        # zero.Init needs DeepSpeed's communication layer before deepspeed.initialize would set it up: wrap the
        # process group Ray Train already created (no second init).
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        # transformers' DeepSpeed integration: from_pretrained builds the model inside deepspeed.zero.Init, so
        # every parameter is partitioned as it is created and no rank ever holds the full weights.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay referenced while the model is built
    vlm = build_vlm(vlm_config_for(cfg.model, device, precision, weights_from))
    vlm.model.train()
    params = [p for p in vlm.model.parameters() if p.requires_grad]
    groups = adamw_groups(vlm.model, t.weight_decay)
    opt = None  # offloaded: DeepSpeed builds DeepSpeedCPUAdam from the config
    if not t.offload_optimizer:
        kw = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
        if device.type == "cuda":
            kw["fused"] = True
        opt = torch.optim.AdamW(groups, **kw)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=vlm.model,
        optimizer=opt,
        model_parameters=groups if opt is None else None,
        # A plain function, not the schedule object: LambdaLR checkpoints the attributes of callable objects
        # and would restore the old schedule; this way a resumed run follows the current config's schedule.
        lr_scheduler=lambda o: LambdaLR(o, lambda step: schedule(step)),
        config=ds_config,
        dist_init_required=False,
    )
    return TrainEngine(
        vlm=vlm,
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        zero_stage=t.zero_stage,
        rank=rank,
        trainable_params=sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        partitioned_at_build=bool(params) and all(hasattr(p, "ds_id") for p in params),
        hf_ds_config=hf_ds_config,
    )
