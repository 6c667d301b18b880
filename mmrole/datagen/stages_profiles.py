"""Stages on the characters: meta info for hypothetical characters, then one profile per character (from a
Character Card, or written by the teacher from the reference text or the meta info)."""

from __future__ import annotations

import json

from mmrole.data.records import HYPOTHETICAL_SCRIPT

from .cards import CardError, card_to_profile, read_card
from .gates import GateError, check_meta_info, check_profile
from .run_state import GenerationRun
from .writer import GeneratedCharacter, profile_markdown


def stage_profiles(run: GenerationRun) -> None:
    """Meta info for hypothetical characters, then a profile per character (card, famous or hypothetical)."""
    gates = run.cfg.gates
    meta: dict[str, dict] = {}
    items = []
    for c in run.characters:
        if c.is_hypothetical and not c.card:
            run.ledger.take("meta_info")
            fields = {"name": c.name, "brief": c.brief or "(none)", "language": c.language}
            items.append(
                run.asker.item("meta_info", "meta_info", fields, fields, character=c.name, context={"spec": c})
            )
    results = run.asker.ask(items)
    for it in items:
        res = results[it.key]
        if run.asker.failed(it, res):
            continue
        try:
            meta[it.character] = check_meta_info(res.reply, it.character, it.context["spec"].language, gates)
            run.ledger.accept("meta_info")
        except GateError as e:
            run.ledger.reject("meta_info", e.code, str(e), it.character)
    items = []
    for c in run.characters:
        run.ledger.take("profile")
        script = HYPOTHETICAL_SCRIPT if c.is_hypothetical else c.source
        if c.card:
            try:
                card = read_card(c.card)
            except CardError as e:
                run.ledger.reject("profile", "bad_card", str(e), c.name)
                continue
            md, structured = card_to_profile(card, c.language)
            run.profiles[c.name] = GeneratedCharacter(
                c.name, script, c.group, c.language, md, structured, first_message=structured["first_message"]
            )
            run.ledger.accept("profile")
            continue
        if c.is_hypothetical:
            if c.name not in meta:
                run.ledger.reject(
                    "profile", "no_meta_info", "the meta info stage gave nothing for this character", c.name
                )
                continue
            fields = {
                "name": c.name,
                "language": c.language,
                "meta_info": json.dumps(meta[c.name], ensure_ascii=False),
            }
            stage = "profile_hypothetical"
        else:
            raw = c.raw_text.strip() or "(no reference text given: use what is well known about the character)"
            fields = {"name": c.name, "source": c.source, "language": c.language, "raw_text": raw}
            stage = "profile_famous"
        items.append(
            run.asker.item(
                stage,
                "profile",
                fields,
                fields,
                character=c.name,
                context={"spec": c, "script": script, "meta": meta.get(c.name)},
            )
        )
    results = run.asker.ask(items)
    for it in items:
        res = results[it.key]
        if run.asker.failed(it, res):
            continue
        c = it.context["spec"]
        try:
            sections = check_profile(res.reply, c.language, gates)
        except GateError as e:
            run.ledger.reject("profile", e.code, str(e), c.name)
            continue
        run.profiles[c.name] = GeneratedCharacter(
            c.name,
            it.context["script"],
            c.group,
            c.language,
            profile_markdown(sections, c.language),
            sections,
            it.context["meta"],
        )
        run.ledger.accept("profile")
