"""Processors that work without torchvision.

transformers 5.x builds the Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors with a video processor, and that one needs
torchvision (not installable on CPU-only torch here). We never feed videos, so for the native families we assemble
the processor from its parts (tokenizer + the PIL image processor + chat template) with ``video_processor=None``.
This reads both our tiny model directories and real checkpoint directories (which also ship a
``video_preprocessor_config.json`` that we simply ignore). Other families go through ``AutoProcessor``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .config import NATIVE_FAMILIES, family_from_model_type

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _processor_base_class(family: str):
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as base
    elif family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as base
    elif family == "qwen3_vl":
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as base
    else:
        raise ValueError(f"no native processor for family {family!r}")
    return base


_NO_VIDEO_CLASSES: dict[str, type] = {}


def no_video_processor_class(family: str) -> type:
    """The family's processor class, patched so that ``video_processor=None`` is accepted."""
    if family not in _NO_VIDEO_CLASSES:
        base = _processor_base_class(family)

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None  # no videos in MMRole; the video processor would need torchvision
            return base.check_argument_for_proper_class(self, argument_name, argument)

        # Keep the base class name so that saved processor_class metadata stays loadable by AutoProcessor.
        cls = type(
            base.__name__,
            (base,),
            {
                "check_argument_for_proper_class": check_argument_for_proper_class,
                "__module__": __name__,
                "__qualname__": f"NoVideo{base.__name__}",
            },
        )
        _NO_VIDEO_CLASSES[family] = cls
    return _NO_VIDEO_CLASSES[family]


def read_model_type(model_path: str, trust_remote_code: bool = False) -> str:
    """``model_type`` from the model's config (local dir or hub id)."""
    p = Path(model_path)
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text()).get("model_type", "")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).model_type


def resolve_family(model_path: str, family: str = "auto", trust_remote_code: bool = False) -> str:
    """``family`` itself, or (for ``auto``) the family read from the model's ``config.json``."""
    if family != "auto":
        return family
    return family_from_model_type(read_model_type(model_path, trust_remote_code))


def resolve_model_paths(model_path: str) -> tuple[str, str]:
    """(processor_path, base_model_path) for a model dir, hub id or peft adapter dir.

    An adapter dir (adapter_config.json, no config.json) loads weights from its ``base_model_name_or_path``;
    its processor parts are used when it has them (we save them with the adapter, with the pixel budget)."""
    p = Path(model_path)
    base = model_path
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or model_path
    proc = model_path if (p / "tokenizer_config.json").is_file() or base == model_path else base
    return proc, base


def load_chat_template(model_path: str, tokenizer: Any = None) -> Optional[str]:
    """The chat template of a model dir: chat_template.jinja, then legacy chat_template.json, then the tokenizer's."""
    p = Path(model_path)
    if (p / CHAT_TEMPLATE_FILE).is_file():
        return (p / CHAT_TEMPLATE_FILE).read_text()
    if (p / "chat_template.json").is_file():
        return json.loads((p / "chat_template.json").read_text())["chat_template"]
    if not p.exists():  # hub id: ask the hub (cached / offline-aware) for the template files
        from huggingface_hub import hf_hub_download

        for name in (CHAT_TEMPLATE_FILE, "chat_template.json"):
            try:
                f = Path(hf_hub_download(model_path, name))
            except Exception:  # file absent on the hub, or offline without cache
                continue
            text = f.read_text()
            return text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default")
    return tmpl


def _image_processor(model_path: str, min_pixels: Optional[int], max_pixels: Optional[int]):
    # The PIL backend needs neither torchvision nor a GPU. Real checkpoints name the torchvision class in
    # preprocessor_config.json; loading that json into the PIL class reads the same fields (patch/merge sizes,
    # mean/std, size or min/max pixels).
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kw: dict[str, Any] = {}
    if min_pixels is not None:
        kw["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        kw["max_pixels"] = int(max_pixels)
    ip = Qwen2VLImageProcessorPil.from_pretrained(model_path, **kw)
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")
    return ip


def build_processor(
    model_path: str,
    family: str = "auto",
    min_pixels: Optional[int] = None,
    max_pixels: Optional[int] = None,
    trust_remote_code: bool = False,
):
    """A processor for ``model_path`` (works without torchvision for the Qwen families).

    ``min_pixels``/``max_pixels`` override the image budget (image tokens = pixels / (patch*merge)^2).
    """
    family = resolve_family(model_path, family, trust_remote_code)
    if family in NATIVE_FAMILIES:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        ip = _image_processor(model_path, min_pixels, max_pixels)
        template = load_chat_template(model_path, tok)
        cls = no_video_processor_class(family)
        proc = cls(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=template)
        return proc
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    ip = getattr(proc, "image_processor", None)
    # Generic processors differ in how they size images; apply the budget where the processor has one.
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is None:
            continue
        if ip is None or not hasattr(ip, name):
            raise ValueError(f"{type(ip).__name__} has no {name}; cannot set the image token budget")
        setattr(ip, name, int(value))
    if getattr(proc, "chat_template", None) is None:
        proc.chat_template = load_chat_template(model_path, getattr(proc, "tokenizer", None))
    return proc


def save_processor(processor: Any, out_dir: str | Path) -> None:
    """Save tokenizer, image processor and chat template (``processor.save_pretrained`` fails without a video
    processor). The layout is the standard one, so ``AutoProcessor`` also loads it where torchvision exists."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(out)
    ip = getattr(processor, "image_processor", None)
    if ip is not None:
        ip.save_pretrained(out)
        # Record the processor class for AutoProcessor (real checkpoints do the same).
        pp = out / "preprocessor_config.json"
        if pp.is_file():
            d = json.loads(pp.read_text())
            d["processor_class"] = type(processor).__name__
            pp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    if getattr(processor, "video_processor", None) is not None:
        processor.video_processor.save_pretrained(out)
    tmpl = getattr(processor, "chat_template", None)
    if isinstance(tmpl, str):
        (out / CHAT_TEMPLATE_FILE).write_text(tmpl)
