"""Typed records of the MMRole dataset: characters, images, dialogues and rendered samples."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

# Directory names used by the published dataset, and the infix used in dialogue ids.
DIALOGUE_TYPES = ("comment", "human-role", "inter-role")
DIALOGUE_ID_INFIX = {
    "comment": "comment",
    "human-role": "human-role-dialogue",
    "inter-role": "role-role-dialogue",
}
GROUPS = ("in-distribution", "out-of-distribution")
# Test-split names used by the published eval folders.
TEST_SETS = {"in-distribution": "in-test", "out-of-distribution": "out-test"}
KINDS = ("fictional", "historical-or-public", "hypothetical")
HYPOTHETICAL_SCRIPT = "Hypothetical Characters"
HUMAN_SPEAKER = "human"
# What the other party is called in comment / human-role dialogues.
DEFAULT_HUMAN_NAME = "a curious human"

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
# Scripts that are historical eras rather than works of fiction ("the Renaissance period", "中国唐代").
_ERA = re.compile(r"(\bperiod\b|\btimes\b|\bera\b|\bage\b|\bdynasty\b|代$|朝$)", re.IGNORECASE)


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text or ""))


def infer_kind(script: str) -> str:
    """Character kind from its script name, as the dataset groups them."""
    if script == HYPOTHETICAL_SCRIPT:
        return "hypothetical"
    if _ERA.search(script.strip()):
        return "historical-or-public"
    return "fictional"


def infer_language(name: str, profile: str) -> str:
    """Chinese for roles whose name or profile is written in Chinese, English otherwise."""
    return "Chinese" if has_cjk(name) or has_cjk(profile[:400]) else "English"


def role_file_stem(name: str) -> str:
    """File stem the dataset uses for a role: spaces become underscores, quotes are kept."""
    return name.replace(" ", "_")


@dataclass(frozen=True)
class Character:
    name: str
    script: str
    group: str  # in-distribution / out-of-distribution
    kind: str  # fictional / historical-or-public / hypothetical
    language: str  # English / Chinese
    profile: str  # markdown profile
    structured_profile: Optional[dict] = None

    @property
    def is_hypothetical(self) -> bool:
        return self.kind == "hypothetical"


@dataclass(frozen=True)
class ImageRef:
    path: str  # relative to images/
    role_info: Optional[str] = None
    place_info: Optional[str] = None
    scene_info: Optional[str] = None

    @property
    def has_info(self) -> bool:
        return bool(self.role_info or self.place_info or self.scene_info)


@dataclass(frozen=True)
class Turn:
    speaker: str  # a character name, or "human"
    text: str


@dataclass(frozen=True)
class Dialogue:
    id: str
    type: str  # comment / human-role / inter-role
    image: ImageRef
    turns: tuple[Turn, ...]
    owner: str  # the role whose file holds the dialogue
    group: str
    source_file: str = ""

    @property
    def speakers(self) -> list[str]:
        seen: list[str] = []
        for t in self.turns:
            if t.speaker not in seen:
                seen.append(t.speaker)
        return seen


# Where image i of a multi-image sample sits in its user text (e.g. in the history line of the turn that carried
# it); the encoder puts the image there. One-image samples carry no marker: their image goes first.
IMAGE_MARKER_PATTERN = re.compile(r"<\|mmrole_image:(\d+)\|>")


def image_marker(index: int) -> str:
    """The placeholder of image ``index`` (0-based, in request order) in a sample's user text."""
    return f"<|mmrole_image:{int(index)}|>"


@dataclass
class Sample:
    """One supervised example: the role's answer at turn k of a dialogue.

    ``user_text`` is the whole rendered question. Where the sample was rendered by us, the text is
    also kept in parts (head, history lines, tail) so a collator can drop the oldest history lines
    to fit a length budget without re-rendering.
    """

    id: str
    system: str
    user_text: str
    image: str  # relative to images/
    target: str
    role: str
    other_role: str
    script: str
    dialogue_type: str
    k: int
    group: str = "in-distribution"
    prompt_head: str = ""
    history_header: str = ""
    history_lines: list[str] = field(default_factory=list)
    history_footer: str = ""  # what follows the history lines (a section separator)
    prompt_tail: str = ""

    def user_text_with_history(self, keep_last: Optional[int] = None) -> str:
        """The user text keeping only the last ``keep_last`` history lines (all when None)."""
        if not self.prompt_head and not self.prompt_tail:
            return self.user_text
        if keep_last is None:
            lines = self.history_lines
        else:
            lines = self.history_lines[len(self.history_lines) - keep_last :] if keep_last > 0 else []
        if not lines:
            return self.prompt_head + self.prompt_tail
        return self.prompt_head + self.history_header + "\n".join(lines) + self.history_footer + self.prompt_tail

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Sample:
        kw = {f: row[f] for f in cls.__dataclass_fields__ if f in row}
        lines = kw.get("history_lines")  # a list, or a numpy array when the row comes from Ray Data
        kw["history_lines"] = [] if lines is None else list(lines)
        kw["k"] = int(kw["k"])
        return cls(**kw)


SAMPLE_FIELDS = tuple(Sample.__dataclass_fields__)


def published_test_record(sample: Sample, answer: Optional[str] = None) -> dict[str, Any]:
    """A sample as a record of the published test split (``data/test/<group>/<type>_test.json``); with ``answer``,
    a record of the published answers files (the answer in ``conversations[1].answer``)."""
    reply: dict[str, Any] = {"from": "assistant", "value": sample.target}
    if answer is not None:
        reply["answer"] = answer
    return {
        "id": sample.id,
        "system": sample.system,
        "image": sample.image,
        "conversations": [{"from": "user", "value": sample.user_text}, reply],
        "role": sample.role,
        "script": sample.script,
        "other_role": sample.other_role,
    }
