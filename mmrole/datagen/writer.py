"""Writers of the published MMRole layout: profiles, image annotations, dialogues and the rendered test split."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmrole.data.records import (
    DIALOGUE_ID_INFIX,
    DIALOGUE_TYPES,
    GROUPS,
    HYPOTHETICAL_SCRIPT,
    published_test_record,
    role_file_stem,
)

PROFILE_TITLES = {
    "English": {
        "introduction": "Brief Introduction",
        "personality": "Personality",
        "life_story": "Life Story",
        "relationships": "Main Interpersonal Relationships",
        "catchphrases": "Catchphrases",
    },
    "Chinese": {
        "introduction": "简介",
        "personality": "性格",
        "life_story": "人生经历",
        "relationships": "主要人际关系",
        "catchphrases": "口头禅",
    },
}


@dataclass
class GeneratedCharacter:
    name: str
    script: str  # the work or era, or "Hypothetical Characters"
    group: str
    language: str
    profile: str  # markdown
    structured: dict  # detailed profile sections
    meta_info: Optional[dict] = None  # hypothetical characters
    first_message: str = ""  # a dialogue seed (from a Character Card)


@dataclass
class GeneratedDialogue:
    owner: str
    group: str
    type: str
    image: str  # relative to images/
    annotation: Optional[dict]
    turns: list  # [(speaker, text)], speaker "human" or a character name
    held_out: bool = False
    id: str = ""
    extra: dict = field(default_factory=dict)


def profile_markdown(sections: dict, language: str) -> str:
    """The profile text in the published style: ``### Section`` headings, catchphrases as a list."""
    titles = PROFILE_TITLES.get(language, PROFILE_TITLES["English"])
    parts = []
    for key, title in titles.items():
        value = sections.get(key)
        if not value:
            continue
        if isinstance(value, list):
            value = "\n".join(f"- {v}" for v in value)
        parts.append(f"### {title}\n{value}")
    return "\n".join(parts)


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def write_profiles(out: Path, characters: list[GeneratedCharacter]) -> None:
    """profiles/<group>/{roles.json, profiles.json, detailed_profiles/, meta_info_hypo/}."""
    for group in GROUPS:
        chars = [c for c in characters if c.group == group]
        if not chars and group != "in-distribution":
            continue
        pdir = out / "profiles" / group
        roles: dict = {}
        for c in chars:
            roles.setdefault(c.script, []).append(c.name)
        _dump(pdir / "roles.json", roles)
        _dump(pdir / "profiles.json", {c.name: c.profile for c in chars})
        for c in chars:
            _dump(pdir / "detailed_profiles" / f"{role_file_stem(c.name)}.json", c.structured)
            if c.meta_info is not None:
                _dump(pdir / "meta_info_hypo" / f"{role_file_stem(c.name)}.json", c.meta_info)


def write_annotations(out: Path, annotations: list[dict]) -> None:
    _dump(out / "images" / "annotations.json", annotations)


def assign_ids(dialogues: list[GeneratedDialogue]) -> None:
    """Published ids: ``<Role_Stem>_<type infix>_<COCO|script>_<n>``, n counting per (role, type, source)."""
    seen: dict = {}
    for d in dialogues:
        source = "COCO" if d.image.startswith("COCO/") else "script"
        k = (d.owner, d.type, source)
        n = seen.get(k, 0)
        seen[k] = n + 1
        d.id = f"{role_file_stem(d.owner)}_{DIALOGUE_ID_INFIX[d.type]}_{source}_{n}"


def dialogue_record(d: GeneratedDialogue) -> dict:
    rec: dict = {"id": d.id, "image": d.image}
    if d.annotation:
        rec.update({k: d.annotation.get(k, "") for k in ("role_info", "place_info", "scene_info")})
    rec["conversations"] = [{"role": s, "value": t} for s, t in d.turns]
    return rec


def write_dialogues(out: Path, dialogues: list[GeneratedDialogue]) -> dict:
    """dialogues/in-distribution/<type>/<Role>_{COCO,script}.json and dialogues/out-of-distribution/<type>.json."""
    files: dict[Path, list] = {}
    for d in dialogues:
        if d.group == "in-distribution":
            source = d.id.rsplit("_", 2)[1]
            f = out / "dialogues" / "in-distribution" / d.type / f"{role_file_stem(d.owner)}_{source}.json"
        else:
            f = out / "dialogues" / "out-of-distribution" / f"{d.type}.json"
        files.setdefault(f, []).append(dialogue_record(d))
    for dtype in DIALOGUE_TYPES:  # the published layout has the type folders even when empty
        (out / "dialogues" / "in-distribution" / dtype).mkdir(parents=True, exist_ok=True)
    for f, recs in files.items():
        _dump(f, recs)
    return {str(f.relative_to(out)): len(r) for f, r in files.items()}


def choose_test_dialogues(dialogues: list[GeneratedDialogue], per_character_type: int) -> None:
    """Mark the last ``per_character_type`` dialogues of each (character, type) as held out for the test split,
    keeping at least one of each for training."""
    by: dict = {}
    for d in dialogues:
        by.setdefault((d.owner, d.type), []).append(d)
    for ds in by.values():
        n = min(per_character_type, len(ds) - 1)
        for d in ds[len(ds) - n :] if n > 0 else []:
            d.held_out = True


def write_test_split(out: Path, held_out_ids: set, seed: int = 0, template: Optional[str] = None) -> dict:
    """data/test/<group>/<type>_test.json: one rendered sample per held-out dialogue (published test format)."""
    from mmrole.data.reader import load_dataset
    from mmrole.data.render import expand_dialogue
    from mmrole.data.templates import load_roleplay_template

    ds = load_dataset(out)
    t = load_roleplay_template(template)
    rng = random.Random(seed)
    test: dict = {}
    for d in ds.iter_dialogues():
        if d.id not in held_out_ids:
            continue
        samples = list(expand_dialogue(d, ds.characters, t))
        if not samples:
            continue
        own = [s for s in samples if s.role == d.owner] or samples  # the owner answers in its own test file
        s = rng.choice(own)
        test.setdefault((s.group, d.type), []).append(published_test_record(s))
    for (group, dtype), recs in sorted(test.items()):
        _dump(out / "data" / "test" / group / f"{dtype}_test.json", recs)
    return {f"{g}/{t}": len(r) for (g, t), r in sorted(test.items())}


__all__ = [
    "GeneratedCharacter",
    "GeneratedDialogue",
    "HYPOTHETICAL_SCRIPT",
    "assign_ids",
    "choose_test_dialogues",
    "profile_markdown",
    "write_annotations",
    "write_dialogues",
    "write_profiles",
    "write_test_split",
]
