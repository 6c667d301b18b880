"""Which inference engine runs a local model: ``hf`` (transformers ``generate``, our batching and shared-prefix
decoding) or ``vllm`` (vLLM: continuous batching, paged KV cache, automatic prefix caching, multi-LoRA).

Pure settings: nothing here imports vLLM. vLLM pins its own torch and transformers, so it lives in a separate
environment (``scripts/bootstrap_vllm.sh`` makes ``.venv-vllm``); :func:`require_vllm` fails with that advice.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from mmrole.config import ConfigError

ENGINES = ("hf", "vllm")
INSTALL_HINT = (
    "vLLM is not installed in this environment ({python}). It pins its own torch and transformers, so it has an "
    "environment of its own: run `bash scripts/bootstrap_vllm.sh` (makes .venv-vllm with vLLM's CPU build, Ray "
    "and mmrole; on GPUs `pip install -e '.[vllm]'` in a CUDA environment) and run the job with "
    ".venv-vllm/bin/python"
)


@dataclass
class VLLMSettings:
    """vLLM engine settings (``<...>.vllm.*``). Defaults suit a CPU test run; the GPU cluster configs set
    ``tensor_parallel_size``, ``gpu_memory_utilization`` and ``max_model_len``."""

    max_model_len: Optional[int] = None  # default: the model's max_length (prompt + reply tokens)
    max_num_seqs: int = 16  # sequences decoded together (continuous batching)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9  # GPU only
    kv_cache_space_gb: int = 1  # CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB)
    enable_prefix_caching: bool = True  # a judge's 8 metric prompts of one answer share their long prefix
    enforce_eager: Optional[bool] = None  # None: eager on CPU (no compile step), CUDA graphs on GPU
    enable_lora: bool = False  # LoRA requests on (on by itself when model_path is an adapter dir)
    max_loras: int = 4  # LoRA adapters active at once
    max_lora_rank: int = 64
    seed: int = 0
    engine_kwargs: dict = field(default_factory=dict)  # any other vllm.EngineArgs field, passed through

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("vllm.max_model_len must be >= 1 (or null: the model's max_length)")
        if self.max_num_seqs < 1 or self.tensor_parallel_size < 1 or self.max_loras < 1:
            raise ConfigError("vllm.max_num_seqs, vllm.tensor_parallel_size and vllm.max_loras must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("vllm.gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_space_gb < 1:
            raise ConfigError("vllm.kv_cache_space_gb must be >= 1 (whole GiB)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_engine(engine: str, where: str) -> None:
    """``engine`` is one of :data:`ENGINES`, else a :class:`ConfigError` naming the key ``where``."""
    if engine not in ENGINES:
        raise ConfigError(f"{where}: {engine!r} is not one of {ENGINES}")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm(where: str = "engine") -> None:
    """Raise a clear error (which environment to build) when ``engine: vllm`` is asked for without vLLM."""
    if not vllm_available():
        import sys

        raise ConfigError(f"{where}: vllm: " + INSTALL_HINT.format(python=sys.executable))


def engine_identity(engine: str, settings: Optional[VLLMSettings]) -> dict:
    """What the engine adds to a cache key: nothing for ``hf`` (keys of existing stores stay valid), the engine
    and the settings that can change replies for ``vllm`` (not memory or placement knobs)."""
    if engine == "hf":
        return {}
    s = asdict(settings or VLLMSettings())
    for k in (
        "gpu_memory_utilization",
        "kv_cache_space_gb",
        "max_num_seqs",
        "max_loras",
        "enforce_eager",
        "enable_lora",
    ):
        s.pop(k, None)
    return {"engine": engine, "vllm": s}
