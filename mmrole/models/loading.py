"""Setting a VLM up for a run: device and dtype, freezing the vision tower or projector, LoRA, quantization."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import DEFAULT_LORA_TARGETS, PROJECTOR_NAMES, VISION_TOWER_NAMES, LoRASettings

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = the current CUDA device when there is one, else CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return d


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _named_submodules(model, names: Sequence[str]) -> list[tuple[str, torch.nn.Module]]:
    """Submodules whose last name component is one of ``names`` (outermost matches only)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, mod in model.named_modules():
        if name.split(".")[-1] in names and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, mod))
    return found


def freeze_parts(model, freeze_vision: bool = False, freeze_projector: bool = False) -> dict[str, int]:
    """Set ``requires_grad=False`` on the vision tower (without its projector) and/or the projector.

    Qwen keeps the projector (``merger``, and Qwen3-VL's ``deepstack_merger_list``) inside ``visual``, so the
    vision tower is frozen parameter by parameter, sparing the projector's. Returns frozen parameter counts."""
    projectors = _named_submodules(model, PROJECTOR_NAMES)
    proj_params = {id(p) for _, m in projectors for p in m.parameters()}
    frozen = {"vision": 0, "projector": 0}
    if freeze_vision:
        towers = _named_submodules(model, VISION_TOWER_NAMES)
        if not towers:
            raise ValueError(
                f"freeze_vision: no vision tower named one of {VISION_TOWER_NAMES} in {type(model).__name__}"
            )
        for _, tower in towers:
            for p in tower.parameters():
                if id(p) not in proj_params and p.requires_grad:
                    p.requires_grad_(False)
                    frozen["vision"] += p.numel()
    if freeze_projector:
        if not projectors:
            raise ValueError(f"freeze_projector: no projector named one of {PROJECTOR_NAMES} in {type(model).__name__}")
        for _, m in projectors:
            for p in m.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen["projector"] += p.numel()
    return frozen


def apply_lora(model, lora: LoRASettings, family: str):
    """Wrap ``model`` with a peft LoRA adapter: a fresh one, or ``lora.adapter_path`` loaded as trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora.adapter_path:
        return PeftModel.from_pretrained(model, lora.adapter_path, is_trainable=True)
    targets = lora.target_modules if lora.target_modules is not None else DEFAULT_LORA_TARGETS[family]
    lcfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
    )
    peft_model = get_peft_model(model, lcfg)
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    if n_lora == 0:  # peft raises for no match in most versions; keep a clear message either way
        raise ValueError(f"LoRA target_modules {targets!r} matched no module of {type(model).__name__}")
    return peft_model


def quantization_config(kind: str, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("VLMConfig.quantization needs bitsandbytes (and CUDA): pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        # QLoRA recipe: NF4 weights, double quantization, matmuls in the compute dtype.
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(VISION_TOWER_NAMES) + ["lm_head"],
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(VISION_TOWER_NAMES) + ["lm_head"])
