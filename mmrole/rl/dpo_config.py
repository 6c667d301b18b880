"""Typed config of a DPO job (``jobs/train_dpo.py``): the training config plus a ``dpo`` section. No torch, Ray or
DeepSpeed here."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmrole.config import ConfigError, load_config_file, path_field
from mmrole.models.config import VLMConfig
from mmrole.train.config import TrainJobConfig

from .dpo import LOSSES

REFERENCES = ("precomputed", "online")
PREFERENCE_SPLIT = "pref_train"  # the split jobs/build_preferences.py writes


@dataclass
class DPOSettings:
    """The preference objective."""

    beta: float = 0.1  # strength of the KL anchor to the reference (implicit reward = beta * log-ratio)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo | sigmoid_norm (per-token mean log-probs: length-normalised)
    label_smoothing: float = 0.0  # sigmoid losses: assumed share of flipped labels (cDPO)
    # precomputed: the reference log-probs of every pair are computed once, before the first step, by the starting
    # policy (kept in <run_dir>/reference_logps.jsonl, reused on resume); online: a frozen copy of the reference
    # model runs beside the policy on every micro-batch (one more model in memory, no pre-pass).
    reference: str = "precomputed"
    # The reference model; null = the policy's starting weights (model.model_path, its adapter if any).
    reference_model: Optional[str] = path_field("model", default=None)


@dataclass
class DPOJobConfig(TrainJobConfig):
    """A DPO run: every training setting of :class:`TrainJobConfig` (ingest, DeepSpeed, checkpoints, trackers) plus
    ``dpo``. Rows are preference pairs (``data.split`` default ``pref_train``, written by build_preferences)."""

    dpo: DPOSettings = field(default_factory=DPOSettings)

    def __post_init__(self):
        super().__post_init__()
        d = self.dpo

        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(self.kind == "agent", "kind", "DPO trains the agent (kind: agent)")
        need(d.beta > 0, "dpo.beta", f"must be > 0, got {d.beta}")
        need(d.loss in LOSSES, "dpo.loss", f"must be one of {LOSSES}, got {d.loss!r}")
        need(0 <= d.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        need(d.loss != "ipo" or d.label_smoothing == 0, "dpo.label_smoothing", "applies to the sigmoid losses only")
        need(d.reference in REFERENCES, "dpo.reference", f"must be one of {REFERENCES}, got {d.reference!r}")
        # A pair's two replies are scored as separate sequences; packed rows would need per-segment sums.
        need(
            not self.data.packing,
            "data.packing",
            "DPO scores each reply as its own padded sequence; set data.packing=false (or leave it null)",
        )
        self.data.packing = False

    @property
    def split(self) -> str:
        return self.data.split or PREFERENCE_SPLIT

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> DPOJobConfig:
        from mmrole.config import build_dataclass

        return build_dataclass(cls, d, source, "")


def reference_model_config(cfg: DPOJobConfig) -> VLMConfig:
    """The frozen reference's model settings: ``dpo.reference_model``, else the policy's start (a fresh LoRA adapter
    is left out: it starts as the identity)."""
    ref = copy.deepcopy(cfg.model)
    ref.gradient_checkpointing = False
    if cfg.dpo.reference_model:
        ref.model_path = cfg.dpo.reference_model
        ref.lora = None
    elif ref.lora is not None and not ref.lora.adapter_path:
        ref.lora = None
    return ref


def load_dpo_config(
    path: Optional[str | Path], overrides: Optional[list[str]] = None, defaults: Optional[dict] = None
) -> DPOJobConfig:
    """Read a DPO YAML config, apply ``key=value`` overrides, build and validate."""
    return load_config_file(DPOJobConfig, path, overrides, defaults)
