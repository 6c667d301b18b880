"""Typed configs of the batch answering and scoring jobs (YAML + ``key=value`` overrides). No Ray here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from mmrole.config import ConfigError, load_config_file, path_field
from mmrole.models.config import GenerationParams, VLMConfig
from mmrole.models.engines import VLLMSettings, check_engine, require_vllm

from .openai_judge import OpenAIJudgeConfig
from .remote_agent import OpenAIAgentConfig

JUDGE_KINDS = ("local", "openai", "serve")
AGENT_KINDS = ("local", "openai")


@dataclass
class PoolSettings:
    """A Ray Data actor pool of model replicas."""

    concurrency: list[int] = field(default_factory=lambda: [1])  # [n] fixed, or [min, max] autoscaling
    batch_size: int = 8  # samples (or judge requests) per model call; for judges a multiple of the metric count
    # keeps each answer's requests in one call, where their shared prompt prefix is prefilled once
    num_cpus: float = 1.0  # logical CPUs per replica (fractional on small machines)
    num_gpus: float = 0.0  # GPUs per replica
    max_restarts: int = -1  # replica restarts after a worker or node dies (-1 = unlimited); blocks are retried

    def concurrency_arg(self):
        c = list(self.concurrency)
        if not c or any(x < 1 for x in c) or len(c) > 2:
            raise ConfigError(f"pool.concurrency: expected [n] or [min, max] with n >= 1, got {c}")
        return c[0] if len(c) == 1 else (c[0], c[1])


@dataclass
class AgentSettings(VLMConfig):
    """The answering agent: a local model (``kind: local``, the :class:`VLMConfig` fields) or an OpenAI-compatible
    endpoint (``kind: openai`` with ``openai.model``, ``openai.base_url``, ...)."""

    model_path: str = path_field("model", literals=("",), default="")  # empty for kind: openai
    kind: str = "local"
    openai: Optional[OpenAIAgentConfig] = None
    engine: str = "hf"  # a local agent runs on transformers (hf) or vLLM (vllm: needs .venv-vllm)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in AGENT_KINDS:
            raise ConfigError(f"agent.kind: {self.kind!r} is not one of {AGENT_KINDS}")
        check_engine(self.engine, "agent.engine")
        if self.kind == "local" and self.engine == "vllm":
            require_vllm("agent.engine")
        if self.kind == "local" and not self.model_path:
            raise ConfigError("agent.model_path: a local agent needs a model (agent.model_path=...)")
        if self.kind == "openai" and (self.openai is None or not self.openai.model):
            raise ConfigError(
                "agent.openai.model: an endpoint agent needs agent.openai.model and agent.openai.base_url"
            )

    def vlm_config(self) -> VLMConfig:
        d = asdict(self)
        for k in ("kind", "openai", "engine", "vllm"):
            d.pop(k)
        return VLMConfig.from_dict(d)


@dataclass
class GenerateJobConfig:
    """``jobs/generate_answers.py``: answer a prepared split with an agent."""

    model_name: str  # the answers are written under <set>_answers/<model_name>/
    agent: AgentSettings
    data: str = path_field("input")  # a folder written by `mmrole data prepare`
    out: str = path_field("output", default="outputs/eval")
    split: str = "test"
    sets: list[str] = field(default_factory=lambda: ["in-test", "out-test"])
    max_samples: Optional[int] = None
    generation: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=256))
    pool: PoolSettings = field(default_factory=PoolSettings)
    ray_address: Optional[str] = None
    retry_failed: bool = False  # answer again the samples whose stored answer is a failure
    progress: bool = True  # a progress bar (rate, ETA) on stderr


@dataclass
class JudgeSettings:
    """Which judge scores: a local reward model, an OpenAI-compatible API, or our Serve /v1/score endpoint."""

    kind: str = "local"
    model: Optional[VLMConfig] = None  # kind=local
    generation: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=256))
    max_retries: int = 2  # re-asks of an unparsable reply
    # kind=local: decode the closing "[Scores]: (A, B)" line under a token mask, so every reply parses
    # (mmrole.eval.score_constraint); part of the cache key and recorded in the report
    constrained_scores: bool = False
    openai: Optional[OpenAIJudgeConfig] = None  # kind=openai
    serve_url: str = ""  # kind=serve, e.g. http://127.0.0.1:8000/judge
    serve_token_env: str = "MMROLE_API_TOKEN"
    template: Optional[str] = path_field("input", default=None)  # judge prompt template YAML (default: packaged)
    engine: str = "hf"  # a local judge runs on transformers (hf) or vLLM (vllm: needs .venv-vllm)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def __post_init__(self):
        if self.kind not in JUDGE_KINDS:
            raise ConfigError(f"judge.kind: {self.kind!r} is not one of {JUDGE_KINDS}")
        check_engine(self.engine, "judge.engine")
        if self.kind == "local" and self.engine == "vllm":
            require_vllm("judge.engine")
        if self.kind == "local" and self.model is None:
            raise ConfigError("judge.model: a local judge needs a model (judge.model.model_path=...)")
        if self.kind == "openai" and self.openai is None:
            raise ConfigError("judge.openai: an API judge needs judge.openai.model and judge.openai.base_url")
        if self.constrained_scores and self.kind != "local":
            raise ConfigError(
                f"judge.constrained_scores: only a local judge (kind: local) can decode under a mask, not {self.kind!r}"
            )
        if self.constrained_scores and self.engine == "vllm":
            raise ConfigError(
                "judge.constrained_scores: the score mask is a transformers logits processor; use judge.engine=hf"
            )
        if self.kind == "serve" and not self.serve_url:
            raise ConfigError("judge.serve_url: a Serve judge needs the endpoint's base URL")


@dataclass
class ScoreJobConfig:
    """``jobs/score_answers.py``: score a model's answers with a judge, write reviews, results and report."""

    eval_dir: str = path_field("input")  # holds <set>_answers/<model_name>/<type>_test.json
    images_root: str = path_field("input")
    judge: JudgeSettings
    model_name: str = ""  # one model, or
    models: Optional[list[str]] = None  # several, scored in one run (one pool of judge replicas)
    out: str = path_field("output", default="")  # default: eval_dir
    metrics: Optional[list[str]] = None  # default: all 8
    swap: bool = False  # position-bias run (A and B shown the other way round; separate store)
    retry_failed: bool = False
    bootstrap: int = 1000
    seed: int = 0
    pool: PoolSettings = field(default_factory=PoolSettings)
    ray_address: Optional[str] = None
    progress: bool = True  # a progress bar (rate, ETA) on stderr

    def __post_init__(self):
        names = self.model_names()
        if not names:
            raise ConfigError("model_name: give model_name=NAME or models=[A, B, ...]")
        dup = sorted({m for m in names if names.count(m) > 1})
        if dup:
            raise ConfigError(f"models: listed more than once: {dup}")

    def model_names(self) -> list[str]:
        return list(self.models or []) + ([self.model_name] if self.model_name and not self.models else [])


def load_job_config(cls, path: Optional[Union[str, Path]], overrides: Optional[list[str]] = None):
    """Build ``cls`` from a YAML file and dotted ``key=value`` overrides (types checked, unknown keys refused)."""
    return load_config_file(cls, path, overrides)


def config_to_dict(cfg) -> dict:
    return asdict(cfg)
