"""Quality gates for generated items: format, language, length, turn order, disclaimers, speaker confusion.

Each gate raises :class:`GateError` with a short code (counted in the summary) and a message naming what failed.
Near-duplicates are checked across dialogues by :mod:`mmrole.datagen.dedup`.
"""

from __future__ import annotations

import re
from typing import Optional

from mmrole.data.records import HUMAN_SPEAKER

from .config import GateConfig

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")
_HUMAN_NAMES = {"human", "user", "a curious human", "the curious human"}
PROFILE_KEYS = ("introduction", "personality", "life_story", "relationships", "catchphrases")
META_KEYS = ("name", "gender", "age", "origin", "personality", "experience")
ANNOTATION_KEYS = ("role_info", "place_info", "scene_info")
MAX_ENGLISH_CJK_RATIO = 0.05


class GateError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among CJK + Latin letters (0 when there are none)."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    return cjk / (cjk + latin) if cjk + latin else 0.0


def check_language(text: str, language: str, gates: GateConfig, what: str) -> None:
    r = cjk_ratio(text)
    if language == "Chinese" and r < gates.min_language_ratio:
        raise GateError("language", f"{what} should be in Chinese (CJK share {r:.2f} < {gates.min_language_ratio})")
    if language == "English" and r > MAX_ENGLISH_CJK_RATIO:
        raise GateError("language", f"{what} should be in English (CJK share {r:.2f})")


def check_disclaimers(text: str, gates: GateConfig, what: str) -> None:
    for pattern in gates.disclaimers:
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            raise GateError("disclaimer", f"{what} has an assistant-style disclaimer: {m.group(0)!r}")


def _strings(reply: dict, keys, what: str) -> dict:
    missing = [k for k in keys if k not in reply]
    if missing:
        raise GateError("format", f"{what}: missing field(s) {missing}")
    out = {}
    for k in keys:
        v = reply[k]
        if not isinstance(v, str):
            raise GateError("format", f"{what}: field {k!r} is {type(v).__name__}, expected a string")
        out[k] = v.strip()
    return out


def check_meta_info(reply: dict, name: str, language: str, gates: GateConfig) -> dict:
    """Meta information of a hypothetical character (the published meta_info_hypo fields)."""
    meta = _strings(reply, META_KEYS, "meta info")
    meta["name"] = name  # the characters file decides the name
    if not meta["personality"] or not meta["experience"]:
        raise GateError("length", "meta info: empty personality or experience")
    check_language(meta["personality"] + meta["experience"], language, gates, "meta info")
    check_disclaimers(" ".join(meta.values()), gates, "meta info")
    return meta


def check_profile(reply: dict, language: str, gates: GateConfig) -> dict:
    """Profile sections (introduction, personality, life_story, relationships, catchphrases)."""
    sections = _strings(reply, PROFILE_KEYS[:-1], "profile")
    phrases = reply.get("catchphrases")
    if isinstance(phrases, str):
        phrases = [phrases]
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise GateError("format", "profile: field 'catchphrases' must be a list of strings")
    sections["catchphrases"] = [p.strip() for p in phrases if p.strip()]
    empty = [k for k in PROFILE_KEYS[:-1] if not sections[k]]
    if empty:
        raise GateError("length", f"profile: empty section(s) {empty}")
    body = "\n".join(sections[k] for k in PROFILE_KEYS[:-1]) + "\n" + "\n".join(sections["catchphrases"])
    low = gates.min_profile_chars_chinese if language == "Chinese" else gates.min_profile_chars
    if not low <= len(body) <= gates.max_profile_chars:
        raise GateError("length", f"profile: {len(body)} characters, outside [{low}, {gates.max_profile_chars}]")
    check_language(body, language, gates, "profile")
    check_disclaimers(body, gates, "profile")
    return sections


def check_annotation(reply: dict, gates: GateConfig) -> dict:
    ann = _strings(reply, ANNOTATION_KEYS, "annotation")
    for k, v in ann.items():
        if len(v) > gates.max_turn_chars:
            raise GateError("length", f"annotation: {k} has {len(v)} characters (max {gates.max_turn_chars})")
    if not ann["scene_info"]:
        raise GateError("length", "annotation: empty scene_info")
    check_disclaimers(" ".join(ann.values()), gates, "annotation")
    return ann


def _speaker(raw, name: str, partner: Optional[str]) -> str:
    s = str(raw).strip()
    if s.lower() in _HUMAN_NAMES:
        return HUMAN_SPEAKER
    for n in (name, partner):
        if n and s.casefold() == n.casefold():
            return n
    return s


def check_dialogue(
    reply: dict, dtype: str, name: str, partner: Optional[str], language: str, gates: GateConfig
) -> list[tuple[str, str]]:
    """The turns of a dialogue as (speaker, text), speakers normalised to ``human`` and the characters' names."""
    turns = reply.get("turns")
    if not isinstance(turns, list) or not turns:
        raise GateError("format", "dialogue: 'turns' must be a non-empty list")
    out: list[tuple[str, str]] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("speaker"), str) or not isinstance(t.get("text"), str):
            raise GateError("format", f"dialogue: turn {i} needs string 'speaker' and 'text'")
        out.append((_speaker(t["speaker"], name, partner), t["text"].strip()))
    speakers = [s for s, _ in out]
    if dtype == "inter-role":
        allowed = {name, partner}
        strangers = sorted({s for s in speakers if s not in allowed})
        if strangers:
            raise GateError(
                "speaker_confusion", f"inter-role: unexpected speaker(s) {strangers} (expected {name!r}, {partner!r})"
            )
        if name not in speakers or partner not in speakers:
            raise GateError("turn_order", "inter-role: both characters must speak")
        for i in range(1, len(speakers)):
            if speakers[i] == speakers[i - 1]:
                raise GateError("speaker_confusion", f"inter-role: {speakers[i]!r} speaks twice in a row (turn {i})")
        for i, (s, text) in enumerate(out):
            other = partner if s == name else name
            if re.match(rf"\s*[\*\"“]?\s*{re.escape(other)}\s*[:：]", text):
                raise GateError("speaker_confusion", f"inter-role: turn {i} by {s!r} is labelled as {other!r}")
        if len(out) < gates.min_turns_inter_role:
            raise GateError("length", f"inter-role: {len(out)} turns (min {gates.min_turns_inter_role})")
    else:
        strangers = sorted({s for s in speakers if s not in (HUMAN_SPEAKER, name)})
        if strangers:
            raise GateError("speaker_confusion", f"{dtype}: unexpected speaker(s) {strangers}")
        expected = [HUMAN_SPEAKER if i % 2 == 0 else name for i in range(len(out))]
        if speakers != expected or speakers[-1] != name:
            raise GateError("turn_order", f"{dtype}: turns must alternate human / {name!r}, human first, {name!r} last")
        if dtype == "comment" and len(out) != 2:
            raise GateError("format", f"comment: {len(out)} turns (expected 2: a question and the answer)")
        if dtype == "human-role" and len(out) < gates.min_turns_human_role:
            raise GateError("length", f"human-role: {len(out)} turns (min {gates.min_turns_human_role})")
    if len(out) > gates.max_turns:
        raise GateError("length", f"{dtype}: {len(out)} turns (max {gates.max_turns})")
    for i, (s, text) in enumerate(out):
        if not gates.min_turn_chars <= len(text) <= gates.max_turn_chars:
            raise GateError(
                "length",
                f"{dtype}: turn {i} has {len(text)} characters, outside [{gates.min_turn_chars}, {gates.max_turn_chars}]",
            )
        check_disclaimers(text, gates, f"{dtype}: turn {i} ({s})")
    # The language is the owner's: a partner from another language may answer in theirs.
    role_text = "\n".join(text for s, text in out if s == name)
    check_language(role_text, language, gates, f"{dtype}: {name}'s turns")
    return out


def check_judgement(reply: dict, metrics: list[str], min_mean: float) -> dict:
    """The judge's scores (1-10 per metric); GateError ``low_score`` when the mean is below ``min_mean``."""
    scores = reply.get("scores")
    if not isinstance(scores, dict):
        raise GateError("judge_format", "judge: 'scores' must be an object of metric -> score")
    out = {}
    for m in metrics:
        v = scores.get(m)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 10:
            raise GateError("judge_format", f"judge: no 1-10 score for {m!r} (got {v!r})")
        out[m] = float(v)
    mean = sum(out.values()) / len(out)
    if mean < min_mean:
        raise GateError("low_score", f"judge: mean score {mean:.1f} < {min_mean} ({reply.get('reason', '')!s:.120})")
    return out
