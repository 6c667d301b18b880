"""Character Card V2 (``spec: chara_card_v2``) import and export, as JSON or as a PNG with a ``chara`` tEXt chunk.

Import maps the card to an MMRole profile: description -> introduction, personality -> personality, scenario ->
scenario, example messages -> example dialogue (``{{char}}``/``{{user}}`` resolved), the first message kept as a
dialogue seed. The whole card is kept in the structured profile so an export gives the same card back.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Union

SPEC = "chara_card_v2"
SPEC_VERSION = "2.0"
# Required by the V2 spec, with their JSON types.
REQUIRED_FIELDS = {
    "name": str,
    "description": str,
    "personality": str,
    "scenario": str,
    "first_mes": str,
    "mes_example": str,
}
OPTIONAL_FIELDS = {
    "creator_notes": str,
    "system_prompt": str,
    "post_history_instructions": str,
    "alternate_greetings": list,
    "character_book": (dict, type(None)),
    "tags": list,
    "creator": str,
    "character_version": str,
    "extensions": dict,
}
PNG_KEYWORD = "chara"
SECTION_TITLES = {
    "English": {
        "introduction": "Brief Introduction",
        "personality": "Personality",
        "scenario": "Scenario",
        "example_dialogue": "Example Dialogue",
    },
    "Chinese": {"introduction": "简介", "personality": "性格", "scenario": "场景", "example_dialogue": "对话示例"},
}


class CardError(ValueError):
    """A malformed card; the message names the file and the field."""


def validate_card(card, source: str = "<card>") -> dict:
    """The card's ``data`` mapping, checked: spec, required fields and the types of the fields present."""
    if not isinstance(card, dict):
        raise CardError(f"{source}: a card is a JSON object, got {type(card).__name__}")
    if card.get("spec") != SPEC:
        raise CardError(f"{source}: field 'spec' must be {SPEC!r}, got {card.get('spec')!r}")
    data = card.get("data")
    if not isinstance(data, dict):
        raise CardError(f"{source}: field 'data' must be an object")
    for name, tp in REQUIRED_FIELDS.items():
        if name not in data:
            raise CardError(f"{source}: missing field 'data.{name}'")
        if not isinstance(data[name], tp):
            raise CardError(f"{source}: field 'data.{name}' must be a string, got {type(data[name]).__name__}")
    if not data["name"].strip():
        raise CardError(f"{source}: field 'data.name' is empty")
    for name, tp in OPTIONAL_FIELDS.items():
        if name in data and not isinstance(data[name], tp):
            raise CardError(f"{source}: field 'data.{name}' has the wrong type ({type(data[name]).__name__})")
    for name in ("alternate_greetings", "tags"):
        if name in data and not all(isinstance(x, str) for x in data[name]):
            raise CardError(f"{source}: field 'data.{name}' must be a list of strings")
    return data


def read_card(path: Union[str, Path]) -> dict:
    """A card from a ``.json`` file or a ``.png`` with a ``chara`` text chunk (base64 JSON); validated."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CardError(f"{path}: cannot read ({e})") from e
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as im:
                text = dict(getattr(im, "text", {}) or {})
        except Exception as e:  # PIL raises many types for corrupt data
            raise CardError(f"{path}: cannot read the PNG ({type(e).__name__}: {e})") from e
        chunk = text.get(PNG_KEYWORD)
        if chunk is None:
            raise CardError(f"{path}: field 'chara' (PNG tEXt chunk) is missing")
        try:
            raw = base64.b64decode(chunk, validate=True)
        except (binascii.Error, ValueError) as e:
            raise CardError(f"{path}: field 'chara' (PNG tEXt chunk) is not base64 ({e})") from e
    try:
        card = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: not a JSON card ({e})") from e
    validate_card(card, str(path))
    return card


def _resolve(text: str, name: str, user: str = "the curious human") -> str:
    return text.replace("{{char}}", name).replace("<BOT>", name).replace("{{user}}", user).replace("<USER>", user)


def card_to_profile(card: dict, language: str = "English") -> tuple[str, dict]:
    """(markdown profile, structured profile) of a validated card; the structured one keeps the card."""
    data = card["data"]
    name = data["name"].strip()
    titles = SECTION_TITLES.get(language, SECTION_TITLES["English"])
    sections = {
        "introduction": _resolve(data["description"], name).strip(),
        "personality": _resolve(data["personality"], name).strip(),
        "scenario": _resolve(data["scenario"], name).strip(),
        "example_dialogue": _resolve(data["mes_example"], name).replace("<START>", "").strip(),
    }
    md = "\n".join(f"### {titles[k]}\n{v}" for k, v in sections.items() if v)
    structured = dict(sections)
    structured["first_message"] = _resolve(data["first_mes"], name).strip()
    structured["card"] = card
    return md, structured


def profile_to_card(name: str, profile: str, structured: dict | None = None) -> dict:
    """A V2 card for a character: the kept card when it was imported, else built from the profile sections."""
    if structured and isinstance(structured.get("card"), dict):
        return structured["card"]
    structured = structured or {}
    text = {k: v for k, v in structured.items() if isinstance(v, str)}
    description = text.get("introduction") or profile
    personality = text.get("personality", "")
    card = {
        "spec": SPEC,
        "spec_version": SPEC_VERSION,
        "data": {
            "name": name,
            "description": description,
            "personality": personality,
            "scenario": text.get("scenario", ""),
            "first_mes": text.get("first_message", ""),
            "mes_example": text.get("example_dialogue", ""),
            "creator_notes": "Exported by mmrole from an MMRole profile.",
            "system_prompt": "",
            "post_history_instructions": "",
            "alternate_greetings": [],
            "tags": [],
            "creator": "",
            "character_version": "",
            "extensions": {"mmrole": {"profile": profile}},
        },
    }
    return card


def write_card(card: dict, path: Union[str, Path], image: Union[str, Path, None] = None) -> Path:
    """Write a card as ``.json``, or as ``.png`` (the given image, or a plain 400x600 one) with a ``chara`` chunk."""
    validate_card(card, "<card to write>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(card, ensure_ascii=False, indent=1)
    if path.suffix.lower() != ".png":
        path.write_text(blob, encoding="utf-8")
        return path
    from PIL import Image, PngImagePlugin

    im = Image.open(image).convert("RGBA") if image else Image.new("RGBA", (400, 600), (90, 90, 110, 255))
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEYWORD, base64.b64encode(blob.encode("utf-8")).decode("ascii"))
    im.save(path, format="PNG", pnginfo=info)
    return path
