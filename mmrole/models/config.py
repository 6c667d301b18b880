"""Typed, YAML-friendly settings of the VLM layer. Importing this module does not import torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from mmrole.config import build_dataclass, path_field

# Families handled natively (our own encoder, processor built without a video processor).
NATIVE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES = NATIVE_FAMILIES + ("generic",)
# Families whose prompts may hold several images (one placeholder per image, patches concatenated, one grid row
# each). The encoder also hands a list to a generic processor, but whether a generic VLM was trained on several
# images per prompt is not in its config, so it is served with one.
MULTI_IMAGE_FAMILIES = NATIVE_FAMILIES

# config.json model_type -> family.
MODEL_TYPE_TO_FAMILY = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
}

_DECODER_PROJ = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
# Default LoRA targets per family. A string is a peft regex (full match on the module name): we restrict it to
# the language model because the Qwen2.5-VL vision MLP also has gate/up/down_proj layers.
DEFAULT_LORA_TARGETS = {
    "qwen2_vl": rf".*language_model.*\.({_DECODER_PROJ})",
    "qwen2_5_vl": rf".*language_model.*\.({_DECODER_PROJ})",
    "qwen3_vl": rf".*language_model.*\.({_DECODER_PROJ})",
    # Most HF VLMs name the decoder `language_model`; the vision tower (vision_tower/visual/vision_model) is left out.
    "generic": rf".*language_model.*\.({_DECODER_PROJ})",
}

# Module-name prefixes (after the `model.` wrapper) of the vision tower and the projector per family.
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("merger", "deepstack_merger_list", "multi_modal_projector", "mm_projector", "connector")


def family_from_model_type(model_type: str) -> str:
    """Our family name for a config.json ``model_type`` (``generic`` for any other VLM)."""
    return MODEL_TYPE_TO_FAMILY.get(model_type, "generic")


def _from_dict(cls, d: Optional[dict], prefix: str):
    """``cls`` built by the one config system (types coerced, unknown keys refused); None stays None."""
    if d is None or isinstance(d, cls):
        return d
    return build_dataclass(cls, dict(d), "", prefix)


@dataclass
class LoRASettings:
    """peft LoRA settings. ``target_modules=None`` uses the family default (text decoder projections)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[list[str] | str] = None
    adapter_path: Optional[str] = path_field(
        "input", default=None
    )  # load an existing adapter (trainable) instead of a fresh one
    modules_to_save: Optional[list[str]] = None  # extra fully-trained modules saved with the adapter
    bias: str = "none"

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional[LoRASettings]:
        return _from_dict(cls, d, "lora")


@dataclass
class VLMConfig:
    """How to load a VLM and turn samples into tensors."""

    # a local model dir (relative paths are resolved on the driver), a hub id, or tiny:<family> (Serve demos)
    model_path: str = path_field("model")
    family: str = "auto"  # qwen2_vl | qwen2_5_vl | qwen3_vl | generic | auto (from config.model_type)
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16 / float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    min_pixels: Optional[int] = None  # image token budget: the image is resized into [min_pixels, max_pixels]
    max_pixels: Optional[int] = None
    max_length: int = 4096  # prompt + target tokens, image tokens included
    attn_implementation: Optional[str] = None  # None = transformers default (sdpa)
    gradient_checkpointing: bool = False
    freeze_vision: bool = False  # vision tower without the projector
    freeze_projector: bool = False
    lora: Optional[LoRASettings] = None
    quantization: Optional[str] = None  # None | "4bit" | "8bit" (QLoRA; needs bitsandbytes and CUDA)
    # Generation: prompts of one batch that share an image and a long token prefix (a judge's 8 metric prompts
    # for one answer) prefill that prefix once and decode from a shared KV cache (native Qwen families).
    share_prefix: bool = True
    min_shared_prefix: int = 64  # tokens; shorter common prefixes are not worth a separate prefill

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRASettings.from_dict(self.lora)
        if self.family not in FAMILIES + ("auto",):
            raise ValueError(f"VLMConfig.family must be one of {FAMILIES + ('auto',)}, got {self.family!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ValueError(f"VLMConfig.dtype: unknown dtype {self.dtype!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"VLMConfig.quantization must be None, '4bit' or '8bit', got {self.quantization!r}")
        if self.max_length <= 0:
            raise ValueError("VLMConfig.max_length must be positive")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        """Build from a YAML mapping; unknown keys are an error (typos should not pass silently)."""
        return _from_dict(cls, dict(d), "model")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationParams:
    """Decoding settings for :meth:`VLM.generate`."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    seed: Optional[int] = None
    stop: Optional[list[str]] = None  # extra stop strings; the reply is cut before the first one

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> GenerationParams:
        return _from_dict(cls, d or {}, "generation")
