"""The simulated human partner's template (``mmrole/templates/converse_partner.yaml``): how a model is asked to stay
a curious human user with a stated intent. Pure: no model, no Ray."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml

from mmrole.data.records import ImageRef, Turn

from .template import JudgeTemplateError, placeholders

PACKAGED_PARTNER = "converse_partner.yaml"
PARTNER_FIELDS = ("role", "role_with_script", "intent", "image_info", "history")
_KEYS = ("system", "prompt", "history_header", "history_line", "image_info_header", "you", "intents")


@dataclass(frozen=True)
class PartnerTemplate:
    """The wording of the simulated human's prompt (see the packaged YAML for the placeholders)."""

    system: str
    prompt: str
    history_header: str
    history_line: str
    image_info_header: str
    you: str
    intents: tuple[str, ...]
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, d, source: str = "<dict>") -> PartnerTemplate:
        if not isinstance(d, dict):
            raise JudgeTemplateError(f"{source}: expected a mapping at the top level")
        missing = [k for k in _KEYS if k not in d]
        unknown = sorted(set(d) - set(_KEYS))
        if missing or unknown:
            raise JudgeTemplateError(f"{source}: missing key(s) {missing}, unknown key(s) {unknown}")
        intents = d["intents"]
        if not isinstance(intents, list) or not intents or not all(isinstance(x, str) and x.strip() for x in intents):
            raise JudgeTemplateError(f"{source}: intents: expected a non-empty list of strings")
        for key in ("system", "prompt"):
            placeholders(str(d[key]), PARTNER_FIELDS, f"{source}: {key}")
        if "history" not in placeholders(str(d["prompt"]), PARTNER_FIELDS, f"{source}: prompt"):
            raise JudgeTemplateError(f"{source}: prompt lacks placeholder {{history}}")
        placeholders(str(d["history_line"]), ("speaker", "text"), f"{source}: history_line")
        for i, x in enumerate(intents):
            placeholders(x, ("role",), f"{source}: intents[{i}]")
        return cls(
            system=str(d["system"]),
            prompt=str(d["prompt"]),
            history_header=str(d["history_header"]),
            history_line=str(d["history_line"]),
            image_info_header=str(d["image_info_header"]),
            you=str(d["you"]),
            intents=tuple(intents),
            source=source,
        )

    def intent(self, index: int, role: str) -> str:
        return self.intents[index % len(self.intents)].format(role=role)

    def render(
        self, *, role: str, script: str, intent: str, image: ImageRef, turns: Sequence[Turn], human: str
    ) -> tuple[str, str]:
        """(system, user text) asking for the human's next message; ``human`` is the human's speaker name in
        ``turns`` (their own turns are shown as ``you``)."""
        info = [
            f" - {k}: {v}"
            for k, v in (
                ("People in it", image.role_info),
                ("Where", image.place_info),
                ("What is happening", image.scene_info),
            )
            if v
        ]
        fields = dict(
            role=role,
            role_with_script=f"{role} from {script}" if script else role,
            intent=intent,
            image_info=self.image_info_header + "\n".join(info) if info else "",
            history=(
                self.history_header
                + "\n".join(
                    self.history_line.format(speaker=self.you if t.speaker == human else t.speaker, text=t.text)
                    for t in turns
                )
                if turns
                else ""
            ),
        )
        return self.system.format(**fields), self.prompt.format(**fields)


def load_partner_template(path: Optional[Union[str, Path]] = None) -> PartnerTemplate:
    """``path`` (YAML), else the packaged ``converse_partner.yaml``."""
    if path:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise JudgeTemplateError(f"{p}: cannot read partner template ({e})") from e
        return PartnerTemplate.from_dict(data, str(p))
    text = resources.files("mmrole.templates").joinpath(PACKAGED_PARTNER).read_text(encoding="utf-8")
    return PartnerTemplate.from_dict(yaml.safe_load(text), f"mmrole/templates/{PACKAGED_PARTNER}")


def packaged_template_path(name: str) -> str:
    """The file path of a packaged template (``converse_turn.yaml``, ...), for configs' defaults."""
    return str(resources.files("mmrole.templates").joinpath(name))
