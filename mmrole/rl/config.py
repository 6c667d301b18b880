"""Typed config of a GRPO job: the training job config (:class:`mmrole.train.config.TrainJobConfig`) plus a
``grpo`` section, built by the one config system (:mod:`mmrole.config`). No torch, Ray or DeepSpeed.

In a GRPO job a *row* is a prompt: ``train.global_batch_size`` prompts per optimizer step (over all workers),
each answered ``grpo.group_size`` times by the current policy; ``train.micro_batch_size`` prompts' rollouts go
through one forward/backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mmrole.config import ConfigError, build_dataclass, load_config_file
from mmrole.eval.job_config import JudgeSettings
from mmrole.train.config import TrainJobConfig

from .rewards import RewardSettings


@dataclass
class GRPOSettings:
    """Rollouts, reward, objective and failure policy of a GRPO run."""

    group_size: int = 4  # rollouts per prompt (G)
    max_new_tokens: int = 128  # reply length cap of a rollout (reserved after the prompt when encoding)
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_batch_size: int = 0  # rows per generate call on a worker (0 = all of a step's rollouts at once)
    clip_eps: float = 0.2  # PPO-style ratio clipping
    kl_coef: float = 0.04  # beta of the k3 KL to the reference (the initial policy, frozen)
    normalize_std: bool = True  # advantages divided by the group's reward std (false = mean-centred only)
    reward: RewardSettings = field(default_factory=RewardSettings)
    judge: Optional[JudgeSettings] = None  # needed when reward.judge > 0 (local reward model, Serve or OpenAI)
    judge_actors: int = 1  # kind=local: reward-model actors per train worker (a Ray actor pool)
    judge_num_cpus: float = 1.0
    judge_num_gpus: float = 0.0
    judge_batch_size: int = 16  # judge requests per call (a multiple of the metric count keeps a rollout together)
    # Stop the run ("ok": false) once failed rewards (rollout errors, unparsable or failed judge replies) exceed
    # this share of all rollouts so far; a step whose every reward failed is skipped (no update).
    max_failed_share: float = 0.2
    eval_group_size: int = 2  # rollouts per held-out prompt when measuring the policy's mean reward
    eval_seed: int = 1234  # held-out rollouts use fixed seeds, so the measurements of a run are paired

    def __post_init__(self):
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(f"grpo.{key}: {msg}")

        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare rollouts of one prompt)")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.rollout_batch_size >= 0, "rollout_batch_size", "must be >= 0")
        need(self.clip_eps > 0, "clip_eps", "must be > 0")
        need(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        need(0 <= self.max_failed_share <= 1, "max_failed_share", "must be in [0, 1]")
        need(self.judge_actors >= 1, "judge_actors", "must be >= 1")
        need(self.judge_batch_size >= 1, "judge_batch_size", "must be >= 1")
        need(self.eval_group_size >= 1, "eval_group_size", "must be >= 1")
        need(
            not self.reward.uses_judge or self.judge is not None,
            "judge",
            "reward.judge > 0 needs a judge (grpo.judge.kind=local|serve|openai ...), or set grpo.reward.judge=0",
        )


@dataclass
class GRPOJobConfig(TrainJobConfig):
    """A GRPO training job: the agent's training config plus ``grpo``."""

    grpo: GRPOSettings = field(default_factory=GRPOSettings)

    def __post_init__(self):
        super().__post_init__()
        if self.kind != "agent":
            raise ConfigError(f"kind: GRPO trains the agent, got {self.kind!r}")
        if self.train.zero_stage == 3:
            raise ConfigError(
                "train.zero_stage: GRPO runs ZeRO 0-2 (the frozen reference policy is a plain replica per worker, "
                "which ZeRO-3's partitioned loading would split)"
            )
        if self.data.packing:
            raise ConfigError("data.packing: GRPO batches rollouts left-padded (no packing); leave it null/false")
        if self.model.max_length <= self.grpo.max_new_tokens:
            raise ConfigError(
                f"grpo.max_new_tokens: {self.grpo.max_new_tokens} leaves no room for a prompt in "
                f"model.max_length={self.model.max_length}"
            )

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> GRPOJobConfig:
        return build_dataclass(cls, d, source, "")


def load_grpo_config(path, overrides: Optional[list[str]] = None, defaults: Optional[dict] = None) -> GRPOJobConfig:
    """Read a GRPO YAML config, apply ``key=value`` overrides, build and validate."""
    return load_config_file(GRPOJobConfig, path, overrides, defaults)
