"""Generation prompt templates (YAML, replaceable): per stage a system prompt, a user prompt and a reply schema."""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml

STAGES = (
    "meta_info",
    "profile_famous",
    "profile_hypothetical",
    "annotation",
    "comment",
    "human_role",
    "inter_role",
    "judge_dialogue",
)
PLACEHOLDERS = {
    "name",
    "source",
    "language",
    "raw_text",
    "brief",
    "meta_info",
    "profile",
    "role_info",
    "place_info",
    "scene_info",
    "partner",
    "partner_source",
    "partner_profile",
    "seed",
    "dialogue",
    "metrics",
    "schema",
}


class GenTemplateError(ValueError):
    """A generation template that lacks a stage or key, or uses an unknown placeholder (named in the message)."""


@dataclass(frozen=True)
class StagePrompt:
    stage: str
    system: str
    user: str
    schema: dict

    @property
    def digest(self) -> str:
        """A short hash of the wording and schema (part of the cache key: changed wording, new items)."""
        blob = json.dumps([self.system, self.user, self.schema], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def render(self, **fields) -> list[dict]:
        """Chat messages for one item; missing placeholders render empty."""
        values = {k: "" for k in PLACEHOLDERS}
        values.update({k: ("" if v is None else str(v)) for k, v in fields.items()})
        values["schema"] = json.dumps(self.schema, ensure_ascii=False)
        return [
            {"role": "system", "content": self.system.format(**values)},
            {"role": "user", "content": self.user.format(**values)},
        ]


@dataclass(frozen=True)
class GenTemplates:
    stages: dict
    source: str = "<builtin>"

    def __getitem__(self, stage: str) -> StagePrompt:
        return self.stages[stage]


def _check(stage: str, key: str, text, source: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise GenTemplateError(f"{source}: stages.{stage}.{key}: expected a non-empty string")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise GenTemplateError(f"{source}: stages.{stage}.{key}: {e}") from e
    unknown = sorted(names - PLACEHOLDERS)
    if unknown:
        raise GenTemplateError(f"{source}: stages.{stage}.{key}: unknown placeholder(s) {unknown}")
    return text


def load_gen_templates(path: Optional[Union[str, Path]] = None) -> GenTemplates:
    """The packaged ``mmrole/templates/datagen.yaml``, or the file at ``path``."""
    if path:
        source = str(path)
        text = Path(path).read_text(encoding="utf-8")
    else:
        source = "mmrole/templates/datagen.yaml"
        text = resources.files("mmrole.templates").joinpath("datagen.yaml").read_text(encoding="utf-8")
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GenTemplateError(f"{source}: invalid YAML ({e})") from e
    if not isinstance(d, dict) or not isinstance(d.get("stages"), dict):
        raise GenTemplateError(f"{source}: expected a mapping with 'stages'")
    stages = {}
    for stage in STAGES:
        s = d["stages"].get(stage)
        if not isinstance(s, dict):
            raise GenTemplateError(f"{source}: missing stage stages.{stage}")
        schema = s.get("schema")
        if not isinstance(schema, dict):
            raise GenTemplateError(f"{source}: stages.{stage}.schema: expected a JSON Schema mapping")
        stages[stage] = StagePrompt(
            stage,
            _check(stage, "system", s.get("system"), source),
            _check(stage, "user", s.get("user"), source),
            schema,
        )
    return GenTemplates(stages, source)
