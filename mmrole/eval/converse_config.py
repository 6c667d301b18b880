"""Typed config of ``mmrole eval converse`` / ``jobs/converse.py`` (YAML + ``key=value`` overrides). No Ray here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mmrole.config import ConfigError, path_field
from mmrole.models.config import GenerationParams

from .converse import CONVERSATIONAL_TYPES
from .converse_templates import packaged_template_path
from .job_config import AgentSettings, JudgeSettings, PoolSettings

SCORING_MODES = ("absolute", "pairwise")
PARTNER_TURNS = ("shared", "live")


@dataclass
class ConverseModel:
    """A model under test: its name (outputs go under this name) and the agent that plays it."""

    name: str
    agent: AgentSettings


@dataclass
class ConverseTemplates:
    """The wording: judge templates per level and mode, the simulated human's template, the role-play template."""

    turn: str = path_field("input", default=packaged_template_path("converse_turn.yaml"))
    conversation: str = path_field("input", default=packaged_template_path("converse_conversation.yaml"))
    pairwise_turn: str = path_field("input", default=packaged_template_path("converse_pairwise_turn.yaml"))
    pairwise_conversation: str = path_field(
        "input", default=packaged_template_path("converse_pairwise_conversation.yaml")
    )
    partner: Optional[str] = path_field("input", default=None)  # default: packaged converse_partner.yaml
    roleplay: Optional[str] = path_field("input", default=None)  # default: packaged roleplay.yaml

    def judge_templates(self) -> dict[str, str]:
        return {
            "turn": self.turn,
            "conversation": self.conversation,
            "pairwise_turn": self.pairwise_turn,
            "pairwise_conversation": self.pairwise_conversation,
        }


@dataclass
class ConverseJobConfig:
    """Whole conversations: every model talks ``turns`` turns with the partner on each test item; the judge scores
    each agent turn and each conversation (absolute and/or pairwise); the report shows drift and repetition."""

    data: str = path_field("input")  # a folder written by `mmrole data prepare` (its test split gives the items)
    models: list[ConverseModel]
    partner: AgentSettings  # the partner's agent: plays the simulated human and the other characters
    judge: Optional[JudgeSettings] = None  # None: hold the conversations only
    out: str = path_field("output", default="outputs/converse")
    dataset_root: str = path_field("input", literals=("",), default="")  # profiles, dialogues; default: manifest's
    turns: int = 4  # agent turns per conversation
    types: list[str] = field(default_factory=lambda: list(CONVERSATIONAL_TYPES))
    max_items: Optional[int] = None
    partner_turns: str = "shared"  # shared: models[0] talks with the partner, the others answer its partner turns
    generation: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=128, seed=0))
    partner_generation: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=64, seed=0))
    scoring: list[str] = field(default_factory=lambda: list(SCORING_MODES))
    templates: ConverseTemplates = field(default_factory=ConverseTemplates)
    seed: int = 0  # intents, pairwise order, bootstrap
    bootstrap: int = 1000
    repetition_n: int = 3  # n of the n-gram overlap between an agent's own turns
    pool: PoolSettings = field(default_factory=PoolSettings)  # replicas holding the agents and the partner
    judge_pool: PoolSettings = field(default_factory=PoolSettings)
    retry_failed: bool = False  # ask again turns / judgements whose stored result is a failure
    ray_address: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        if not self.models:
            raise ConfigError("models: give at least one model ({name, agent})")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"models: names listed more than once: {dup}")
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise ConfigError(f"models: {bad}: a name is a folder name (no '/', not empty)")
        if self.turns < 1:
            raise ConfigError(f"turns: must be >= 1, got {self.turns}")
        unknown = [t for t in self.types if t not in CONVERSATIONAL_TYPES]
        if unknown:
            raise ConfigError(f"types: {unknown} not conversational; choose from {list(CONVERSATIONAL_TYPES)}")
        if self.partner_turns not in PARTNER_TURNS:
            raise ConfigError(f"partner_turns: {self.partner_turns!r} is not one of {list(PARTNER_TURNS)}")
        bad_modes = [m for m in self.scoring if m not in SCORING_MODES]
        if bad_modes:
            raise ConfigError(f"scoring: {bad_modes} unknown; choose from {list(SCORING_MODES)}")
        if "pairwise" in self.scoring and len(self.models) > 1 and self.partner_turns != "shared":
            raise ConfigError(
                "scoring: pairwise compares replies to the same partner turns: needs partner_turns=shared"
            )
        if self.judge is not None and self.judge.kind == "serve":
            raise ConfigError("judge.kind: the Serve /v1/score judge has its own template; use local or openai")
