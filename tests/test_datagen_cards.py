"""Character Card V2 import/export: JSON and PNG round trips, malformed cards refused naming the field, a card used
as a character's profile."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image, PngImagePlugin

from mmrole.cli import main as mmrole_main
from mmrole.data.reader import load_dataset
from mmrole.datagen.cards import CardError, card_to_profile, profile_to_card, read_card, validate_card, write_card

CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Mira Solace",
        "description": "{{char}} is a cartographer of floating islands who maps the winds for sky-ships.",
        "personality": "Curious, stubborn, warm with strangers, sharp with liars.",
        "scenario": "{{char}} meets {{user}} on the deck of a sky-ship at dawn.",
        "first_mes": "*unrolls a map* You're just in time, {{user}}. The winds have changed.",
        "mes_example": "<START>\n{{user}}: Where are we?\n{{char}}: Above the Amber Reach, where storms sleep.",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": ["Morning, traveller."],
        "tags": ["fantasy"],
        "creator": "tester",
        "character_version": "1",
        "extensions": {},
    },
}


def test_json_and_png_round_trip_through_import_and_export(tmp_path, capsys):
    root = tmp_path / "ds"
    for suffix in ("json", "png"):
        src = write_card(CARD, tmp_path / f"in.{suffix}")
        assert read_card(src) == CARD
        assert mmrole_main(["data", "import-card", str(src), "--out", str(root), "--script", "Sky Tales"]) == 0
        out = tmp_path / f"out.{suffix}"
        assert mmrole_main(["data", "export-card", str(root), "--name", "Mira Solace", "--out", str(out)]) == 0
        assert read_card(out) == CARD
    if_png = Image.open(tmp_path / "out.png")
    assert json.loads(base64.b64decode(if_png.text["chara"]))["spec"] == "chara_card_v2"
    ds = load_dataset(root)
    c = ds.characters["Mira Solace"]
    assert c.script == "Sky Tales" and c.group == "in-distribution"
    assert "### Brief Introduction\nMira Solace is a cartographer" in c.profile
    assert "### Scenario\nMira Solace meets the curious human" in c.profile
    assert "the curious human: Where are we?" in c.profile and "<START>" not in c.profile
    assert c.structured_profile["first_message"].startswith("*unrolls a map* You're just in time, the curious human")


def test_export_of_a_generated_profile_builds_a_valid_card(tmp_path):
    card = profile_to_card(
        "Ada", "### Brief Introduction\nAda builds bridges.", {"introduction": "Ada builds bridges."}
    )
    validate_card(card)
    p = write_card(card, tmp_path / "ada.png")
    back = read_card(p)
    assert back["data"]["description"] == "Ada builds bridges."
    md, structured = card_to_profile(back)
    assert md.startswith("### Brief Introduction\nAda builds bridges.")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: c.update(spec="chara_card_v1"), "spec"),
        (lambda c: c.pop("data"), "data"),
        (lambda c: c["data"].pop("first_mes"), "data.first_mes"),
        (lambda c: c["data"].update(personality=["a", "list"]), "data.personality"),
        (lambda c: c["data"].update(tags="fantasy"), "data.tags"),
        (lambda c: c["data"].update(name="  "), "data.name"),
    ],
)
def test_malformed_cards_are_refused_naming_the_field(tmp_path, mutate, field, capsys):
    card = json.loads(json.dumps(CARD))
    mutate(card)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(card))
    with pytest.raises(CardError, match=f"'{field}'"):
        read_card(p)
    assert mmrole_main(["data", "import-card", str(p), "--out", str(tmp_path / "ds")]) == 1
    assert field in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_png_without_or_with_a_broken_chara_chunk(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(CardError, match="'chara'.*missing"):
        read_card(plain)
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", "%%% not base64 %%%")
    broken = tmp_path / "broken.png"
    Image.new("RGB", (8, 8)).save(broken, pnginfo=info)
    with pytest.raises(CardError, match="'chara'.*base64"):
        read_card(broken)


def test_a_card_is_a_character_profile_for_generate(tmp_path):
    from canned_teacher import CannedTeacher, generate, make_images

    make_images(tmp_path / "pics", n=2, corrupt=False)
    card = write_card(CARD, tmp_path / "mira.png")
    chars = [{"name": "Mira Solace", "source": "Sky Tales", "card": str(card)}, {"name": "Nora Quist"}]
    with CannedTeacher() as t:
        rc, root = generate(tmp_path, chars, t.url)
        prompts = [json.dumps(b["messages"]) for b in t.bodies]
    assert rc == 0
    assert not any("Character: Mira Solace" in p for p in prompts)  # no profile request for the card
    assert any("human-role" in p and "The winds have changed" in p for p in prompts)  # first message as a seed
    ds = load_dataset(root)
    assert ds.characters["Mira Solace"].structured_profile["card"] == CARD
