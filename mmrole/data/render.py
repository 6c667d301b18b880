"""Dialogue -> role-play samples (the expansion rule) and the rendering of the question text.

Expansion rule:
- comment: one sample, the role's answer (k = 1);
- human-role: one sample per role turn k, the human's turn k-1 being the words to answer;
- inter-role: one sample per utterance k, its speaker being the role (k = 0: start the conversation).
Sample ids are ``<dialogue id>_<k>``, the same as the published test split.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from .records import (
    HUMAN_SPEAKER,
    Character,
    Dialogue,
    ImageRef,
    Sample,
    Turn,
)
from .templates import RoleplayTemplate


class RenderError(ValueError):
    """A dialogue turn that cannot become a sample (reason in the message)."""

    def __init__(self, sample_id: str, reason: str, code: str):
        super().__init__(f"{sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason
        self.code = code  # short machine-readable reason, for counts


@dataclass
class RenderStats:
    """Counts of what rendering took in, gave out and rejected (with reasons)."""

    dialogues_in: int = 0
    dialogues_out: int = 0
    turns_rejected: int = 0
    dialogues_rejected: int = 0
    samples_out: int = 0
    rejected_by_reason: dict = field(default_factory=dict)
    rejects: list = field(default_factory=list)  # dicts: file, id, reason

    def reject(self, source: str, rid: str, code: str, reason: str) -> None:
        self.rejected_by_reason[code] = self.rejected_by_reason.get(code, 0) + 1
        self.rejects.append({"file": source, "id": rid, "code": code, "reason": reason})


_SENTENCE_END = (".", "!", "?", "。", "！", "？", "…", '"', "'", ")")


def _finish(value: str, field_name: str, t: RoleplayTemplate) -> str:
    """Image-info values end with a full stop where the template asks for it (annotations often lack one)."""
    if field_name in (t.image_info.get("ensure_period") or ()) and not value.endswith(_SENTENCE_END):
        return value + "."
    return value


def _party(role: Character, other: Optional[Character], t: RoleplayTemplate) -> dict:
    if other is None:
        return {"other": t.human_indefinite, "other_definite": t.human_definite, "other_script": ""}
    return {"other": other.name, "other_definite": other.name, "other_script": other.script}


def render_question(
    t: RoleplayTemplate,
    role: Character,
    other: Optional[Character],
    image: ImageRef,
    history: list[Turn],
    last_words: Optional[str],
    role_display: Optional[str] = None,
) -> tuple[str, str, list[str], str]:
    """Render the user text in parts: (head, history header, history lines, tail).

    ``other`` None means the other party is the human. ``last_words`` None means "start the
    conversation". Join them with :func:`assemble_question` (footer = the section separator).
    """
    sep = t.section_separator
    names = {"role": role_display or role.name, "script": role.script, "language": role.language}
    names.update(_party(role, other, t))
    key = ("hypothetical" if role.is_hypothetical else "scripted") + ("_vs_human" if other is None else "_vs_role")
    sections = [t.opening[key].format(**names), t.profile.format(name=role.name, profile=role.profile)]
    if other is not None:
        sections.append(t.profile.format(name=other.name, profile=other.profile))
    info = [
        t.image_info[f].format(value=_finish(getattr(image, f), f, t))
        for f in ("role_info", "place_info", "scene_info")
        if getattr(image, f)
    ]
    if info:
        sections.append("\n".join([t.image_info["header"], *info]))
    head = sep.join(sections) + sep
    if last_words is None:
        tail = t.instruction_start.format(**names)
    else:
        tail = t.instruction_respond.format(last_words=last_words, **names)
    lines = [t.history_line.format(speaker=h.speaker, text=h.text) for h in history]
    header = t.history_header.format(**names)
    return head, header, lines, tail


def assemble_question(head: str, header: str, lines: list[str], footer: str, tail: str) -> str:
    """The full user text from its parts (the history section only when there are lines)."""
    return head + header + "\n".join(lines) + footer + tail if lines else head + tail


def expand_dialogue(
    d: Dialogue,
    characters: Mapping[str, Character],
    t: RoleplayTemplate,
    stats: Optional[RenderStats] = None,
) -> Iterator[Sample]:
    """Yield the samples of one dialogue by the expansion rule; unusable turns are counted in ``stats``."""
    stats = stats if stats is not None else RenderStats()
    stats.dialogues_in += 1
    produced = 0

    def reject(rid: str, code: str, reason: str) -> None:
        stats.reject(d.source_file, rid, code, reason)

    if not d.turns:
        stats.dialogues_rejected += 1
        reject(d.id, "empty_dialogue", "dialogue has no turns")
        return
    speakers = [s for s in d.speakers if s != HUMAN_SPEAKER]
    unknown = [s for s in speakers if s not in characters]
    if unknown:
        stats.dialogues_rejected += 1
        reject(d.id, "unknown_speaker", f"no profile for speaker(s) {unknown}")
        return
    if d.type == "comment":
        positions = [1] if len(d.turns) >= 2 else []
        if not positions:
            stats.dialogues_rejected += 1
            reject(d.id, "unanswered", "comment dialogue has no answer from the role")
            return
    elif d.type == "human-role":
        positions = [k for k, turn in enumerate(d.turns) if turn.speaker != HUMAN_SPEAKER]
    else:
        positions = list(range(len(d.turns)))
    for k in positions:
        sid = f"{d.id}_{k}"
        turn = d.turns[k]
        if turn.speaker == HUMAN_SPEAKER:
            stats.turns_rejected += 1
            reject(sid, "human_target", "the turn to answer is the human's, not a role's")
            continue
        if not turn.text.strip():
            stats.turns_rejected += 1
            reject(sid, "empty_target", "the role's turn is empty")
            continue
        role = characters[turn.speaker]
        if d.type == "inter-role":
            others = [s for s in speakers if s != turn.speaker]
            other = characters[others[0]] if others else role  # a role talking to itself (published quirk)
        else:
            other = None
        if k == 0:
            if d.type != "inter-role":
                stats.turns_rejected += 1
                reject(sid, "no_prompt", "the role speaks first in a dialogue with a human")
                continue
            history, last = [], None
        else:
            history, last = list(d.turns[: k - 1]), d.turns[k - 1].text
            if not last.strip():
                stats.turns_rejected += 1
                reject(sid, "empty_prompt", "the words to answer are empty")
                continue
        head, header, lines, tail = render_question(t, role, other, d.image, history, last)
        produced += 1
        stats.samples_out += 1
        yield Sample(
            id=sid,
            system=t.system,
            user_text=assemble_question(head, header, lines, t.section_separator, tail),
            image=d.image.path,
            target=turn.text,
            role=role.name,
            other_role=t.human_indefinite if other is None else other.name,
            script=role.script,
            dialogue_type=d.type,
            k=k,
            group=role.group,
            prompt_head=head,
            history_header=header,
            history_lines=lines,
            history_footer=t.section_separator,
            prompt_tail=tail,
        )
    if produced:
        stats.dialogues_out += 1
    else:
        stats.dialogues_rejected += 1


def turn_sample(
    t: RoleplayTemplate,
    role: Character,
    other: Optional[Character],
    image: ImageRef,
    turns: Sequence[Turn],
    *,
    sample_id: str,
    dialogue_type: str,
) -> Sample:
    """The sample asking ``role`` for its next utterance in a live conversation (``turns`` so far), rendered as
    training samples are: the last turn is the words to answer, the earlier ones the history; no turns asks the
    role to open. ``other`` None means the other party is the human."""
    if turns and turns[-1].speaker == role.name:
        raise ValueError(f"{sample_id}: the last turn is {role.name}'s own; the other party must speak first")
    history, last = (list(turns[:-1]), turns[-1].text) if turns else ([], None)
    head, header, lines, tail = render_question(t, role, other, image, history, last)
    return Sample(
        id=sample_id,
        system=t.system,
        user_text=assemble_question(head, header, lines, t.section_separator, tail),
        image=image.path,
        target="",
        role=role.name,
        other_role=t.human_indefinite if other is None else other.name,
        script=role.script,
        dialogue_type=dialogue_type,
        k=len(turns),
        group=role.group,
        prompt_head=head,
        history_header=header,
        history_lines=lines,
        history_footer=t.section_separator,
        prompt_tail=tail,
    )
