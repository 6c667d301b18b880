"""The VLM layer: load any image-text-to-text model, turn role-play samples into model inputs, and model outputs
into text. Re-exports are lazy so that importing configs (e.g. from YAML on a driver) does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "VLMConfig": "config",
    "LoRASettings": "config",
    "GenerationParams": "config",
    "FAMILIES": "config",
    "NATIVE_FAMILIES": "config",
    "DEFAULT_LORA_TARGETS": "config",
    "SampleEncoder": "encoding",
    "SampleTooLong": "encoding",
    "SampleRejected": "encoding",
    "Rejected": "encoding",
    "EncodeStats": "encoding",
    "IGNORE_INDEX": "batching",
    "build_encoder": "encoding",
    "plan_packs": "batching",
    "VLM": "vlm",
    "build_vlm": "vlm",
    "merge_lora": "vlm",
    "apply_lora": "loading",
    "freeze_parts": "loading",
    "resolve_device": "loading",
    "resolve_dtype": "loading",
    "build_processor": "processor",
    "save_processor": "processor",
    "resolve_family": "processor",
    "resolve_model_paths": "processor",
    "make_tiny_vlm": "tiny",
    "tiny_image": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers see the real names
    # ruff: noqa: F401
    from .batching import IGNORE_INDEX, plan_packs
    from .config import DEFAULT_LORA_TARGETS, FAMILIES, NATIVE_FAMILIES, GenerationParams, LoRASettings, VLMConfig
    from .encoding import (
        EncodeStats,
        Rejected,
        SampleEncoder,
        SampleRejected,
        SampleTooLong,
        build_encoder,
    )
    from .loading import apply_lora, freeze_parts, resolve_device, resolve_dtype
    from .processor import build_processor, resolve_family, resolve_model_paths, save_processor
    from .tiny import make_tiny_vlm, tiny_image
    from .vlm import VLM, build_vlm, merge_lora
