"""Typed settings of the Serve apps (the ``args`` of a Serve config), built by the one config system."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from mmrole.config import ConfigError, build_dataclass, path_field
from mmrole.models.config import GenerationParams, VLMConfig

TOKEN_ENV = "MMROLE_API_TOKEN"


def config_from_dict(cls, d: Optional[Mapping], where: str):
    """Dataclass built by the one config system; unknown keys and wrong types fail naming the dotted key."""
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    return build_dataclass(cls, dict(d), "", where if where != cls.__name__ else "")


@dataclass
class RequestLimits:
    """What one request may carry. Checked before any image decoding or model work."""

    max_body_bytes: int = 16 * 2**20
    # images of one chat request (Qwen-VL families; other models take 1). /v1/roleplay and the judge take one.
    max_images: int = 4
    max_image_bytes: int = 8 * 2**20  # decoded (binary) size of one image
    max_image_pixels: int = 25_000_000  # width * height, read from the image header
    # all images of one request together: several images cost no more decoding memory than one max-size image
    max_total_image_pixels: int = 25_000_000
    max_image_side: int = 12_000
    max_aspect_ratio: float = 200.0  # Qwen's smart_resize refuses more extreme shapes
    max_new_tokens: int = 1024  # upper bound for max_tokens
    max_text_chars: int = 100_000  # all text of one request together
    max_messages: int = 64
    max_history_turns: int = 64
    max_stop: int = 4
    max_stop_chars: int = 64

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"limits.{f.name} must be positive")

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> RequestLimits:
        return config_from_dict(cls, d, "limits")


@dataclass
class BatchSettings:
    """``@serve.batch``: a batch runs when it is full or when its first row has waited ``batch_wait_timeout_s``
    (only waited while other requests are in flight: a lone request starts at once)."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError("batching.max_batch_size must be >= 1")
        if self.batch_wait_timeout_s < 0:
            raise ValueError("batching.batch_wait_timeout_s must be >= 0")

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> BatchSettings:
        return config_from_dict(cls, d, "batching")


@dataclass
class DeploymentSettings:
    """Ray Serve deployment options, typed. ``autoscaling`` (a Serve ``autoscaling_config``) replaces
    ``num_replicas``. ``max_ongoing_requests`` must be >= the batch size, or batches never fill."""

    num_replicas: Optional[int] = 1
    autoscaling: Optional[dict] = None
    max_ongoing_requests: int = 32  # requests a replica works on; more get the app's own 503 (Retry-After)
    max_queued_requests: int = 64  # beyond this the proxy answers 503 at once instead of queueing
    # Extra requests Serve hands to a busy replica so that the app answers them (a JSON 503 with Retry-After,
    # counted in /v1/stats) instead of Serve's queue filling; cheap GETs (page, stats, health) pass through them.
    overflow_requests: int = 32
    num_cpus: float = 0.5  # fractional: on small boxes whole-CPU replicas starve other Ray tasks
    num_gpus: float = 0.0
    memory_bytes: Optional[int] = None
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 30.0
    env: dict = field(default_factory=dict)  # extra environment variables of the replicas

    def __post_init__(self):
        if self.autoscaling is not None:
            self.num_replicas = None  # Serve refuses both
        elif self.num_replicas is None or self.num_replicas < 1:
            raise ValueError("deployment.num_replicas must be >= 1 (or give deployment.autoscaling)")
        if self.max_ongoing_requests < 1 or self.max_queued_requests == 0 or self.max_queued_requests < -1:
            raise ValueError("deployment.max_ongoing_requests must be >= 1, max_queued_requests >= 1 (or -1)")
        if self.overflow_requests < 0:
            raise ValueError("deployment.overflow_requests must be >= 0")

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> DeploymentSettings:
        return config_from_dict(cls, d, "deployment")

    def serve_options(self) -> dict:
        """Keyword arguments for ``Deployment.options(...)``."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.memory_bytes:
            actor["memory"] = self.memory_bytes
        if self.env:
            actor["runtime_env"] = {"env_vars": {str(k): str(v) for k, v in self.env.items()}}
        opts: dict[str, Any] = dict(
            max_ongoing_requests=self.max_ongoing_requests + self.overflow_requests,
            max_queued_requests=self.max_queued_requests,
            ray_actor_options=actor,
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=self.health_check_timeout_s,
            graceful_shutdown_wait_loop_s=self.graceful_shutdown_wait_loop_s,
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
        )
        if self.autoscaling is not None:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


@dataclass
class AppConfig:
    """Settings shared by the agent and the judge app (the ``args`` of a Serve config)."""

    model: dict = field(default_factory=dict)  # VLMConfig fields; model_path "tiny:<family>" builds a tiny model
    model_name: str = "mmrole"
    generation: dict = field(default_factory=dict)  # default GenerationParams
    limits: RequestLimits = field(default_factory=RequestLimits)
    batching: BatchSettings = field(default_factory=BatchSettings)
    deployment: DeploymentSettings = field(default_factory=DeploymentSettings)
    # Path fields are marked but not resolved at build time: each replica reads them in its own copy of the app's
    # working dir (runtime_env), which is where a relative path in a Serve config points.
    # characters for /v1/roleplay; "demo" builds the demo dataset
    dataset_root: Optional[str] = path_field("input", literals=("demo",), default=None)
    # role-play template (None: $MMROLE_ROLEPLAY_TEMPLATE or packaged)
    template_path: Optional[str] = path_field("input", default=None)
    api_token_env: str = TOKEN_ENV  # bearer-token auth is on when this variable is set and non-empty
    torch_threads: Optional[int] = None
    stuck_batch_s: float = 600.0
    engine: str = "hf"  # hf (transformers) or vllm (needs vLLM: scripts/bootstrap_vllm.sh on CPU)
    vllm: dict = field(
        default_factory=dict
    )  # VLLMSettings fields (mmrole/models/engines.py)  # a batch running longer than this makes check_health fail (replica restarts)

    def __post_init__(self):
        self.limits = RequestLimits.from_dict(self.limits)
        self.batching = BatchSettings.from_dict(self.batching)
        self.deployment = DeploymentSettings.from_dict(self.deployment)
        if not self.model.get("model_path"):
            raise ValueError("model.model_path is required (a model dir, a hub id, or tiny:<family>)")
        VLMConfig.from_dict(self.model)  # typos and wrong types fail at deploy time, naming model.<key>
        GenerationParams.from_dict(self.generation)  # typos fail at deploy time, not at the first request
        from mmrole.models.engines import VLLMSettings, check_engine

        check_engine(self.engine, "engine")
        # typos fail at deploy time, naming vllm.<key>; a replica without vLLM fails at start, saying what to install
        config_from_dict(VLLMSettings, self.vllm, "vllm")
        if self.deployment.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"deployment.max_ongoing_requests ({self.deployment.max_ongoing_requests}) must be >= "
                f"batching.max_batch_size ({self.batching.max_batch_size}), or batches stay small"
            )

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> AppConfig:
        return config_from_dict(cls, d, cls.__name__)

    def default_params(self) -> GenerationParams:
        return GenerationParams.from_dict(self.generation)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AgentAppConfig(AppConfig):
    """The role-playing agent. ``adapters`` maps extra model names to LoRA adapter dirs, served on the one base
    model of each replica (peft), or to full model dirs, served with Serve model multiplexing."""

    model_name: str = "mmrole-agent"
    adapters: dict = field(default_factory=dict)
    max_adapters: int = 4  # LoRA adapters loaded on the base model per replica (least recently used evicted)
    max_adapter_bytes: Optional[int] = None  # and at most this many bytes of adapter weights (None: no cap)

    def __post_init__(self):
        super().__post_init__()
        if self.max_adapters < 1:
            raise ValueError("max_adapters must be >= 1")
        if self.max_adapter_bytes is not None and self.max_adapter_bytes < 1:
            raise ValueError("max_adapter_bytes must be >= 1 (or null)")


@dataclass
class JudgeAppConfig(AppConfig):
    """The reward-model judge: unparsable replies are re-asked like the offline ``VLMJudge`` (sampling with
    ``retry_temperature`` and seed ``seed + attempt``)."""

    model_name: str = "mmrole-judge"
    judge_template_path: Optional[str] = path_field("input", default=None)
    max_retries: int = 2
    retry_temperature: float = 0.7
    # `<out>/converse` of `mmrole eval converse`: the page can open its stored conversations and per-turn scores
    converse_dir: Optional[str] = path_field("input", default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
