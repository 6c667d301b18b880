"""Typed configs of ``mmrole data generate``: the characters file and the run settings (teacher, gates, sizes).

Built with the one config system (:mod:`mmrole.config`): an unknown key or a missing ``name`` fails with a
``ConfigError`` naming the file, the character and the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from mmrole.config import ConfigError, build_dataclass, load_config_file, read_yaml_mapping
from mmrole.data.records import GROUPS

LANGUAGES = ("English", "Chinese")
HYPOTHETICAL_SOURCES = ("hypothetical", "Hypothetical Characters")
EXECUTORS = ("local", "ray")
STRUCTURED_OUTPUT = ("auto", "json_schema", "off")


@dataclass
class CharacterSpec:
    """One character to generate data for (an entry of the characters file)."""

    name: str
    source: str = "hypothetical"  # the work (or era) the character comes from, or "hypothetical"
    raw_text: str = ""  # encyclopedic text to summarise (famous characters)
    raw_text_path: Optional[str] = None  # ... or a file holding it (relative to the characters file)
    language: str = "English"  # English | Chinese: the language the character's dialogues are written in
    group: str = "in-distribution"  # in-distribution | out-of-distribution
    partner: Optional[str] = None  # the other character in inter-role dialogues (default: the next one in the file)
    brief: str = ""  # a hint for hypothetical characters (age, job, place, ...)
    card: Optional[str] = None  # a Character Card V2 (JSON/PNG): its profile is used, no profile teacher call

    def __post_init__(self):
        if not str(self.name).strip():
            raise ConfigError("name: must not be empty")
        if self.language not in LANGUAGES:
            raise ConfigError(f"language: {self.language!r} is not one of {LANGUAGES}")
        if self.group not in GROUPS:
            raise ConfigError(f"group: {self.group!r} is not one of {GROUPS}")
        if not str(self.source).strip():
            raise ConfigError("source: must not be empty (a work, an era, or 'hypothetical')")

    @property
    def is_hypothetical(self) -> bool:
        return self.source.strip() in HYPOTHETICAL_SOURCES


def load_characters(path: Union[str, Path]) -> list[CharacterSpec]:
    """Read a characters YAML (``characters: [{name, source, ...}, ...]``); raw_text_path is read here."""
    path = Path(path)
    d = read_yaml_mapping(path)
    unknown = sorted(set(d) - {"characters"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a characters file has 'characters'")
    entries = d.get("characters")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: characters: expected a non-empty list of characters")
    out: list[CharacterSpec] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ConfigError(f"{path}: characters[{i}]: expected a mapping, got {type(e).__name__}")
        label = f"characters[{i}]" + (f" ({e['name']})" if e.get("name") else " (no name)")
        try:
            spec = build_dataclass(CharacterSpec, e, "", label)
        except ConfigError as err:  # the dataclass's own checks do not know the label: add it
            msg = str(err)
            raise ConfigError(f"{path}: {msg}" if label in msg else f"{path}: {label}.{msg}") from None
        if spec.raw_text_path:
            p = Path(spec.raw_text_path)
            p = p if p.is_absolute() else path.parent / p
            try:
                spec.raw_text = p.read_text(encoding="utf-8")
            except OSError as err:
                raise ConfigError(f"{path}: {label}.raw_text_path: cannot read {p} ({err})") from err
        if spec.card:
            p = Path(spec.card)
            spec.card = str(p if p.is_absolute() else path.parent / p)
        out.append(spec)
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: characters: duplicate name(s) {dup}")
    for i, c in enumerate(out):
        if c.partner is not None and c.partner not in names:
            raise ConfigError(f"{path}: characters[{i}] ({c.name}).partner: {c.partner!r} is not in the file")
        if c.partner == c.name:
            raise ConfigError(f"{path}: characters[{i}] ({c.name}).partner: a character cannot partner itself")
    return out


@dataclass
class TeacherConfig:
    """The teacher: any OpenAI-compatible ``/chat/completions`` endpoint (GPT-4o-class API, vLLM, our Serve agent)."""

    model: str = "gpt-4o"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # the variable holding the key; None = no auth
    require_api_key: bool = True  # False for a local server without auth (vLLM, our Serve agent)
    max_concurrency: int = 8  # requests in flight to the teacher, in all
    timeout_s: float = 120.0
    max_http_retries: int = 4  # on 429, 5xx, timeouts, connection errors
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    retry_after_max_s: float = 120.0
    max_reasks: int = 1  # re-asks of a malformed (non-JSON) reply
    temperature: float = 0.7
    max_tokens: int = 1500
    seed: Optional[int] = 0
    structured_output: str = "auto"  # auto (json_schema, dropped if the endpoint refuses it) | json_schema | off
    send_images: bool = True  # image as a data URL in annotation and dialogue prompts (off for text-only teachers)
    image_max_pixels: int = 1_003_520
    price_input_per_mtok: float = 2.5  # USD per million prompt tokens (cost estimate only)
    price_output_per_mtok: float = 10.0  # USD per million completion tokens

    def __post_init__(self):
        if self.max_concurrency < 1:
            raise ConfigError("teacher.max_concurrency: must be >= 1")
        if self.structured_output not in STRUCTURED_OUTPUT:
            raise ConfigError(
                f"teacher.structured_output: {self.structured_output!r} is not one of {STRUCTURED_OUTPUT}"
            )
        if self.max_http_retries < 0 or self.max_reasks < 0:
            raise ConfigError("teacher.max_http_retries / teacher.max_reasks: must be >= 0")

    @property
    def identity(self) -> str:
        """What makes two teachers different for the cache."""
        return f"{self.base_url.rstrip('/')}|{self.model}|t={self.temperature}|seed={self.seed}"


@dataclass
class GateConfig:
    """Quality gates applied to every generated item."""

    min_turn_chars: int = 8
    max_turn_chars: int = 2000
    min_profile_chars: int = 200
    min_profile_chars_chinese: int = 80  # Chinese says as much in about a third of the characters
    max_profile_chars: int = 20000
    min_turns_human_role: int = 4  # human + character turns
    min_turns_inter_role: int = 4
    max_turns: int = 20
    min_language_ratio: float = 0.3  # share of CJK among letters for Chinese characters (and max for English: 0.05)
    near_duplicate_jaccard: float = 0.8  # character 5-gram Jaccard at or above which a dialogue is a near-duplicate
    disclaimers: list[str] = field(
        default_factory=lambda: [
            r"\bas an ai\b",
            r"\bi(?: a|')m an ai\b",
            r"\bai language model\b",
            r"\blanguage model\b",
            r"\bi cannot (?:assist|help) with\b",
            r"\bi'?m sorry, but i can(?:no|')t\b",
            r"\bas a virtual assistant\b",
            r"作为(?:一个)?(?:AI|人工智能)",
            r"我(?:只)?是(?:一个)?(?:AI|人工智能|语言模型)",
        ]
    )

    def __post_init__(self):
        if not 0 < self.near_duplicate_jaccard <= 1:
            raise ConfigError("gates.near_duplicate_jaccard: must be in (0, 1]")
        if self.min_turn_chars < 0 or self.max_turn_chars <= self.min_turn_chars:
            raise ConfigError("gates.max_turn_chars: must be greater than gates.min_turn_chars")


ROLEPLAY_METRICS = ("Personality Consistency", "Knowledge Consistency", "Tone Consistency")


@dataclass
class DialogueJudgeConfig:
    """Optional judge of every kept dialogue on the role-playing metrics (1-10 each); low scores are rejected."""

    enabled: bool = False
    teacher: Optional[TeacherConfig] = None  # the judge's endpoint (default: the teacher itself)
    metrics: list[str] = field(default_factory=lambda: list(ROLEPLAY_METRICS))
    min_mean_score: float = 6.0  # a dialogue whose mean score is below this is rejected

    def __post_init__(self):
        from mmrole.eval.metrics import METRICS

        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ConfigError(f"judge.metrics: unknown or empty {unknown}; known: {list(METRICS)}")
        if not 1 <= self.min_mean_score <= 10:
            raise ConfigError("judge.min_mean_score: must be within 1..10")


@dataclass
class DialogueCounts:
    """How many dialogues to write per (character, image) and type, and how many to hold out for the test split."""

    comment: int = 1
    human_role: int = 1
    inter_role: int = 1
    test_per_character_type: int = 1  # dialogues per (character, type) held out into data/test

    def __post_init__(self):
        for k in ("comment", "human_role", "inter_role", "test_per_character_type"):
            if getattr(self, k) < 0:
                raise ConfigError(f"dialogues.{k}: must be >= 0")

    def per_type(self) -> dict[str, int]:
        return {"comment": self.comment, "human-role": self.human_role, "inter-role": self.inter_role}


@dataclass
class GenerateConfig:
    """``mmrole data generate`` / ``jobs/generate_data.py``."""

    characters: str = ""  # the characters YAML
    images: str = ""  # a folder of images (optional annotations.json inside)
    out: str = ""  # the dataset root to write (published MMRole layout)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    dialogues: DialogueCounts = field(default_factory=DialogueCounts)
    judge: DialogueJudgeConfig = field(default_factory=DialogueJudgeConfig)
    templates: Optional[str] = None  # generation prompt templates YAML (default: packaged datagen.yaml)
    images_subdir: str = ""  # folder under images/ the images are copied to (default: the input folder's name)
    cache_dir: str = ""  # per-item teacher cache (default: <out>/.datagen_cache)
    executor: str = "local"  # local (asyncio in this process) | ray (Ray Data pipelines)
    ray_actors: int = 2  # Ray executor: teacher-calling actors (each holds teacher.max_concurrency / ray_actors)
    ray_address: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor: {self.executor!r} is not one of {EXECUTORS}")
        if self.ray_actors < 1:
            raise ConfigError("ray_actors: must be >= 1")


def load_generate_config(path: Optional[Union[str, Path]], overrides: Optional[list[str]] = None) -> GenerateConfig:
    """The run config from an optional YAML and dotted overrides; characters/images/out are required."""
    cfg = load_config_file(GenerateConfig, path, overrides)
    for k in ("characters", "images", "out"):
        if not getattr(cfg, k):
            raise ConfigError(f"{k}: required (the characters YAML, the image folder, the output root)")
    return cfg
