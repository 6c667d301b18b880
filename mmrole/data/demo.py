"""``mmrole data demo``: a small self-made dataset in the exact published MMRole layout.

Six characters (in- and out-of-distribution, fictional, historical, hypothetical, one Chinese-speaking),
Pillow-drawn images, dialogues of all three types (with the published quirks: an empty dialogue and an
unanswered comment), a rendered test split, published-format training data and reward-model data, so every
stage runs offline. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image, ImageDraw

from .records import DIALOGUE_ID_INFIX, HYPOTHETICAL_SCRIPT, published_test_record, role_file_stem

COLORS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
_COLORS_ZH = {"red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
_SHAPES_ZH = {"circle": "圆", "square": "方块", "triangle": "三角"}


@dataclass(frozen=True)
class DemoCharacter:
    name: str
    script: str
    group: str
    profile: str
    catchphrase: str
    zh: bool = False
    structured: Optional[dict] = None


CHARACTERS = (
    DemoCharacter(
        "Captain Nova",
        "Starlight Voyagers",
        "in-distribution",
        "### Introduction\nCaptain Nova commands the starship Lumen.\n### Personality\nBold, warm, "
        'quick to laugh, fond of star charts.\n### Catchphrases\n- "Full sails to the stars!"',
        "Full sails to the stars!",
    ),
    DemoCharacter(
        "Professor Quill",
        "Starlight Voyagers",
        "in-distribution",
        "### Introduction\nProfessor Quill is the ship's scientist.\n### Personality\nPrecise, "
        'curious, a little pedantic.\n### Catchphrases\n- "Fascinating, let us measure it."',
        "Fascinating, let us measure it.",
    ),
    DemoCharacter(
        "Elena Varga",
        "the Age of Sail",
        "in-distribution",
        "### Introduction\nElena Varga was a navigator in the Age of Sail.\n### Personality\nCalm, "
        'observant, speaks in nautical terms.\n### Catchphrases\n- "Mind the wind."',
        "Mind the wind.",
    ),
    DemoCharacter(
        "Maya Chen",
        HYPOTHETICAL_SCRIPT,
        "in-distribution",
        "### Introduction\nMaya Chen is a 29-year-old botanist from Vancouver.\n### Personality\n"
        'Gentle, patient, loves plants.\n### Catchphrases\n- "Everything grows in time."',
        "Everything grows in time.",
        structured={
            "name": "Maya Chen",
            "gender": "Female",
            "age": "29",
            "origin": "Vancouver",
            "personality": "Gentle and patient",
            "experience": "A botanist.",
        },
    ),
    DemoCharacter(
        "林风",
        "江湖传说",
        "in-distribution",
        "### 简介\n林风是江湖传说中的剑客。\n### 性格\n豪爽、正直、爱喝茶。\n### 口头禅\n- “剑在心中。”",
        "剑在心中。",
        zh=True,
    ),
    DemoCharacter(
        "Rowan Hale",
        "Fogbound Mysteries",
        "out-of-distribution",
        "### Introduction\nRowan Hale is a detective in a foggy harbour town.\n### Personality\n"
        'Dry humour, sharp eyes.\n### Catchphrases\n- "Every clue has a shadow."',
        "Every clue has a shadow.",
    ),
    DemoCharacter(
        "Sam Ortiz",
        HYPOTHETICAL_SCRIPT,
        "out-of-distribution",
        "### Introduction\nSam Ortiz is a 41-year-old baker from Seville.\n### Personality\n"
        'Cheerful and talkative.\n### Catchphrases\n- "Fresh from the oven!"',
        "Fresh from the oven!",
    ),
)
# Inter-role partners (both speakers are dataset characters).
PARTNERS = {
    "Captain Nova": "Professor Quill",
    "Professor Quill": "Captain Nova",
    "Elena Varga": "Captain Nova",
    "Maya Chen": "Elena Varga",
    "林风": "Professor Quill",
    "Rowan Hale": "Sam Ortiz",
    "Sam Ortiz": "Rowan Hale",
}
QUESTIONS = (
    "What do you see in this picture?",
    "What does this image make you think of?",
    "Which shape catches your eye first?",
    "How would you describe these colours?",
    "Does this remind you of anything from your life?",
)
QUESTIONS_ZH = ("你在这张图里看到了什么？", "这张图让你想到什么？", "哪个形状最吸引你？")


def _draw(path: Path, rng: random.Random, size=(128, 96)) -> list[tuple[str, str]]:
    """Draw 1-3 coloured shapes; returns what was drawn as (colour, shape) pairs."""
    img = Image.new("RGB", size, tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    items = []
    for _ in range(rng.randint(1, 3)):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        x, y = rng.randint(0, size[0] - 40), rng.randint(0, size[1] - 40)
        s = rng.randint(20, 38)
        box = (x, y, x + s, y + s)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=COLORS[color])
        items.append((color, shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
    return items


def _describe(items, zh: bool) -> str:
    if zh:
        return "、".join(f"{_COLORS_ZH[c]}的{_SHAPES_ZH[s]}" for c, s in items)
    return ", ".join(f"a {c} {s}" for c, s in items)


def _answer(ch: DemoCharacter, items, rng: random.Random) -> str:
    if ch.zh:
        return f"我看到{_describe(items, True)}。{ch.catchphrase}"
    opener = rng.choice(("Ah,", "Well,", "Look,", "Hmm,"))
    return f"{opener} I see {_describe(items, False)}. {ch.catchphrase}"


def build_demo(
    out: Union[str, Path],
    seed: int = 0,
    dialogues_per_type: int = 4,
    rm_builder: Optional[Callable[[Path], dict]] = None,
) -> dict:
    """Write the demo dataset under ``out`` (the ``MMRole_dataset`` root); returns counts."""
    out = Path(out)
    rng = random.Random(seed)
    counts = {"characters": len(CHARACTERS), "images": 0, "dialogues": 0}
    by_name = {c.name: c for c in CHARACTERS}
    # Profiles
    for group in ("in-distribution", "out-of-distribution"):
        pdir = out / "profiles" / group
        pdir.mkdir(parents=True, exist_ok=True)
        chars = [c for c in CHARACTERS if c.group == group]
        roles: dict = {}
        for c in chars:
            roles.setdefault(c.script, []).append(c.name)
        (pdir / "roles.json").write_text(json.dumps(roles, ensure_ascii=False, indent=1), encoding="utf-8")
        (pdir / "profiles.json").write_text(
            json.dumps({c.name: c.profile for c in chars}, ensure_ascii=False, indent=1), encoding="utf-8"
        )
        for c in chars:
            sub = "meta_info_hypo" if c.script == HYPOTHETICAL_SCRIPT else "detailed_profiles"
            data = c.structured or {"introduction": c.profile.split("\n")[1], "catchphrases": [c.catchphrase]}
            (pdir / sub).mkdir(exist_ok=True)
            (pdir / sub / f"{role_file_stem(c.name)}.json").write_text(
                json.dumps(data, ensure_ascii=False), encoding="utf-8"
            )
    # Images
    images = out / "images"
    annotations = []
    drawn: dict[str, list] = {}
    coco = [f"COCO/train2017/{i:012d}.jpg" for i in range(1, 13)]
    for rel in coco:
        drawn[rel] = _draw(images / rel, rng)
    script_imgs: dict[str, list[str]] = {}
    for c in CHARACTERS:
        folder = c.script.replace(" ", "_")
        for i in range(1, 3):
            rel = f"{folder}/{i:02d}.png"
            if rel not in drawn:
                drawn[rel] = _draw(images / rel, rng)
                annotations.append(
                    {
                        "image": rel,
                        "role_info": c.name if i == 1 else "",
                        "place_info": rng.choice(["The harbour", "A quiet garden", "The bridge"]),
                        "scene_info": "" if i == 1 else f"Shapes: {_describe(drawn[rel], False)}",
                    }
                )
            script_imgs.setdefault(c.name, []).append(rel)
    counts["images"] = len(drawn)
    (images / "annotations.json").write_text(json.dumps(annotations, ensure_ascii=False, indent=1), encoding="utf-8")

    def dialogue(c: DemoCharacter, dtype: str, source: str, idx: int) -> dict:
        img = rng.choice(coco) if source == "COCO" else rng.choice(script_imgs[c.name])
        items = drawn[img]
        did = f"{role_file_stem(c.name)}_{DIALOGUE_ID_INFIX[dtype]}_{source}_{idx}"
        qs = QUESTIONS_ZH if c.zh else QUESTIONS
        rec: dict = {"id": did, "image": img}
        if source == "script":
            ann = next(a for a in annotations if a["image"] == img)
            rec.update({k: ann[k] for k in ("role_info", "place_info", "scene_info")})
        if dtype == "comment":
            conv = [{"from": "human", "value": rng.choice(qs)}, {"role": c.name, "value": _answer(c, items, rng)}]
        elif dtype == "human-role":
            conv = []
            for _ in range(rng.randint(2, 3)):
                conv += [{"role": "human", "value": rng.choice(qs)}, {"role": c.name, "value": _answer(c, items, rng)}]
        else:
            partner = by_name[PARTNERS[c.name]]
            conv = []
            for _j in range(rng.randint(2, 3)):
                conv += [
                    {"role": c.name, "value": _answer(c, items, rng)},
                    {"role": partner.name, "value": _answer(partner, items, rng)},
                ]
        rec["conversations"] = conv
        return rec

    ood: dict[str, list] = {t: [] for t in DIALOGUE_ID_INFIX}
    for c in CHARACTERS:
        for dtype in DIALOGUE_ID_INFIX:
            for source in ("COCO", "script"):
                recs = [dialogue(c, dtype, source, i) for i in range(dialogues_per_type if source == "COCO" else 2)]
                if c.name == "Captain Nova" and source == "COCO":
                    # Published quirks: an empty dialogue, and a comment nobody answered.
                    if dtype == "comment":
                        recs.append(
                            {
                                "id": f"Captain_Nova_comment_COCO_{len(recs)}",
                                "image": coco[0],
                                "conversations": [{"from": "human", "value": QUESTIONS[0]}],
                            }
                        )
                    else:
                        recs.append(
                            {
                                "id": f"Captain_Nova_{DIALOGUE_ID_INFIX[dtype]}_COCO_{len(recs)}",
                                "image": coco[1],
                                "conversations": [],
                            }
                        )
                counts["dialogues"] += len(recs)
                if c.group == "out-of-distribution":
                    ood[dtype] += recs
                    continue
                f = out / "dialogues" / "in-distribution" / dtype / f"{role_file_stem(c.name)}_{source}.json"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    for dtype, recs in ood.items():
        f = out / "dialogues" / "out-of-distribution" / f"{dtype}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    counts.update(_write_rendered_splits(out, seed))
    if rm_builder is not None:
        counts.update(rm_builder(out))
    return counts


def _write_rendered_splits(out: Path, seed: int) -> dict:
    """data/test (one sample per held-out dialogue) and data/train, in the published formats."""
    from .reader import load_dataset
    from .render import expand_dialogue
    from .templates import load_roleplay_template

    ds = load_dataset(out)
    t = load_roleplay_template()
    rng = random.Random(seed + 1)
    test: dict = {}
    train = []
    for d in ds.iter_dialogues():
        samples = list(expand_dialogue(d, ds.characters, t))
        if not samples:
            continue
        # The last COCO dialogue of each (role, type) goes to the test split, like the published one.
        idx = int(d.id.rsplit("_", 1)[1])
        is_test = "_COCO_" in d.id and idx == 1
        if is_test:
            s = rng.choice(samples)
            test.setdefault((s.group, d.type), []).append(published_test_record(s))
        else:
            train += [
                {
                    "id": s.id,
                    "conversations": [
                        {"from": "user", "value": f"Picture 1: <img>{s.image}</img>\n{s.user_text}"},
                        {"from": "assistant", "value": s.target},
                    ],
                }
                for s in samples
            ]
    for (group, dtype), recs in test.items():
        f = out / "data" / "test" / group / f"{dtype}_test.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    f = out / "data" / "train" / "train.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(train, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"test_samples": sum(len(v) for v in test.values()), "train_samples_published_format": len(train)}
