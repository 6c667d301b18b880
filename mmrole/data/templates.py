"""Prompt templates: YAML files with the wording, so users can swap it without touching code."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml

TEMPLATE_ENV = "MMROLE_ROLEPLAY_TEMPLATE"
_REQUIRED = {
    "system": None,
    "human_party": ("indefinite", "definite"),
    "opening": ("scripted_vs_human", "scripted_vs_role", "hypothetical_vs_human", "hypothetical_vs_role"),
    "profile": None,
    "image_info": ("header", "role_info", "place_info", "scene_info"),
    "history": ("header", "line"),
    "instruction": ("respond", "start"),
    "section_separator": None,
}


class TemplateError(ValueError):
    """A template file that is missing keys or uses unknown placeholders."""


@dataclass(frozen=True)
class RoleplayTemplate:
    """The wording of every part of a rendered role-play question."""

    system: str
    human_indefinite: str
    human_definite: str
    opening: dict
    profile: str
    image_info: dict
    history_header: str
    history_line: str
    instruction_respond: str
    instruction_start: str
    section_separator: str
    source: str = "<builtin>"

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> RoleplayTemplate:
        for key, sub in _REQUIRED.items():
            if key not in d:
                raise TemplateError(f"{source}: missing key {key!r}")
            if sub:
                for s in sub:
                    if not isinstance(d[key], dict) or s not in d[key]:
                        raise TemplateError(f"{source}: missing key {key}.{s}")
        t = cls(
            system=str(d["system"]),
            human_indefinite=d["human_party"]["indefinite"],
            human_definite=d["human_party"]["definite"],
            opening=dict(d["opening"]),
            profile=d["profile"],
            image_info=dict(d["image_info"]),
            history_header=d["history"]["header"],
            history_line=d["history"]["line"],
            instruction_respond=d["instruction"]["respond"],
            instruction_start=d["instruction"]["start"],
            section_separator=d["section_separator"],
            source=source,
        )
        t._check_placeholders()
        return t

    def _check_placeholders(self) -> None:
        allowed = {
            "role",
            "script",
            "other",
            "other_definite",
            "other_script",
            "language",
            "name",
            "profile",
            "value",
            "speaker",
            "text",
            "last_words",
        }
        texts = [
            self.system,
            self.profile,
            self.history_header,
            self.history_line,
            self.instruction_respond,
            self.instruction_start,
            *self.opening.values(),
            *(v for v in self.image_info.values() if isinstance(v, str)),
        ]
        for text in texts:
            for _, field_name, _, _ in string.Formatter().parse(text):
                if field_name is not None and field_name not in allowed:
                    raise TemplateError(f"{self.source}: unknown placeholder {{{field_name}}} in {text[:60]!r}")


def load_roleplay_template(path: Optional[Union[str, Path]] = None) -> RoleplayTemplate:
    """Load a role-play template: ``path``, else $MMROLE_ROLEPLAY_TEMPLATE, else the packaged one."""
    path = path or os.environ.get(TEMPLATE_ENV)
    if path:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise TemplateError(f"{p}: cannot read template ({e})") from e
        return RoleplayTemplate.from_dict(data, str(p))
    text = resources.files("mmrole.templates").joinpath("roleplay.yaml").read_text(encoding="utf-8")
    return RoleplayTemplate.from_dict(yaml.safe_load(text), "mmrole/templates/roleplay.yaml")
