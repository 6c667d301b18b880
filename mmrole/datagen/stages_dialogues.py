"""Stages on the dialogues: per (character, image) the comment, human-role and inter-role dialogues, the
near-duplicate check across a character's dialogues, and the optional judge rating of each kept dialogue."""

from __future__ import annotations

from typing import Optional

from mmrole.data.records import DIALOGUE_TYPES

from .config import CharacterSpec
from .dedup import NearDuplicateIndex
from .gates import GateError, check_dialogue, check_judgement
from .run_state import GenerationRun
from .writer import GeneratedDialogue

TYPE_STAGE = {"comment": "comment", "human-role": "human_role", "inter-role": "inter_role"}


def info_fields(ann: Optional[dict]) -> dict:
    """The template fields of an image's information, labelled (empty where absent)."""
    ann = ann or {}
    labels = {"role_info": "Who: ", "place_info": "Where: ", "scene_info": "What: "}
    return {k: (labels[k] + ann[k].strip()) if ann.get(k, "").strip() else "" for k in labels}


def partner_of(run: GenerationRun, c: CharacterSpec) -> Optional[str]:
    """The inter-role partner: the one named, else the next character in the file that has a profile."""
    if c.partner:
        return c.partner
    names = [x.name for x in run.characters]
    i = names.index(c.name)
    for j in range(1, len(names)):
        other = names[(i + j) % len(names)]
        if other in run.profiles:
            return other
    return None


def stage_dialogues(run: GenerationRun) -> list[GeneratedDialogue]:
    """The configured number of dialogues of each type per (character, image), through the gates and the
    near-duplicate check."""
    counts = run.cfg.dialogues.per_type()
    items = []
    for c in run.characters:
        for rel in run.images:
            for dtype in DIALOGUE_TYPES:
                for n in range(counts[dtype]):
                    run.ledger.take("dialogues")
                    ch = run.profiles.get(c.name)
                    if ch is None:
                        run.ledger.reject(
                            "dialogues",
                            "no_profile",
                            "the character has no profile (see the profile stage)",
                            c.name,
                            rel,
                            dtype,
                        )
                        continue
                    ann = run.annotations.get(rel)
                    fields = {
                        "name": c.name,
                        "source": ch.script,
                        "language": c.language,
                        "profile": ch.profile,
                        **info_fields(ann),
                    }
                    if ch.first_message and dtype == "human-role":
                        fields["seed"] = (
                            f"For the voice of {c.name}, this is how they once opened a conversation: {ch.first_message}"
                        )
                    partner = None
                    if dtype == "inter-role":
                        partner = partner_of(run, c)
                        if partner is None or partner not in run.profiles:
                            run.ledger.reject(
                                "dialogues",
                                "no_partner",
                                f"no partner with a profile for an inter-role dialogue (partner {partner!r})",
                                c.name,
                                rel,
                                dtype,
                            )
                            continue
                        p = run.profiles[partner]
                        fields.update(partner=p.name, partner_source=p.script, partner_profile=p.profile)
                    inputs = {**fields, "image": run.images[rel]["sha"]}
                    items.append(
                        run.asker.item(
                            TYPE_STAGE[dtype],
                            "dialogues",
                            inputs,
                            fields,
                            run.image_url(rel),
                            variant=n,
                            character=c.name,
                            image=rel,
                            dtype=dtype,
                            context={"partner": partner, "ann": ann},
                        )
                    )
    results = run.asker.ask(items)
    out = []
    dedup = NearDuplicateIndex(run.cfg.gates.near_duplicate_jaccard)
    for it in items:
        res = results[it.key]
        if run.asker.failed(it, res):
            continue
        ch = run.profiles[it.character]
        try:
            turns = check_dialogue(res.reply, it.dtype, it.character, it.context["partner"], ch.language, run.cfg.gates)
        except GateError as e:
            run.ledger.reject("dialogues", e.code, str(e), it.character, it.image, it.dtype)
            continue
        run.ledger.accept("dialogues")
        run.ledger.take("near_duplicates")
        text = "\n".join(t for s, t in turns if s == it.character)
        dup = dedup.check_and_add(it.character, f"{it.image}/{it.dtype}", text)
        if dup is not None:
            run.ledger.reject(
                "near_duplicates",
                "near_duplicate",
                f"{dup[1]:.2f} Jaccard similarity with the dialogue on {dup[0]}",
                it.character,
                it.image,
                it.dtype,
            )
            continue
        run.ledger.accept("near_duplicates")
        out.append(GeneratedDialogue(it.character, ch.group, it.dtype, it.image, it.context["ann"], turns))
    return out


def stage_judge(run: GenerationRun, dialogues: list[GeneratedDialogue]) -> list[GeneratedDialogue]:
    """Optional: a judge rates each kept dialogue on the role-playing metrics; low means are rejected."""
    j = run.cfg.judge
    if not j.enabled:
        return dialogues
    items = []
    for n, d in enumerate(dialogues):
        run.ledger.take("judge")
        ch = run.profiles[d.owner]
        text = "\n".join(f"{s}: {t}" for s, t in d.turns)
        fields = {"name": d.owner, "source": ch.script, "profile": ch.profile, "dialogue": text}
        fields["metrics"] = ", ".join(j.metrics)
        items.append(
            run.asker.item(
                "judge_dialogue",
                "judge",
                fields,
                fields,
                character=d.owner,
                image=d.image,
                dtype=d.type,
                context={"n": n},
            )
        )
    results = run.asker.ask(items, who="judge")
    kept = []
    for it in items:
        res = results[it.key]
        if run.asker.failed(it, res):
            continue
        d = dialogues[it.context["n"]]
        try:
            d.extra["judge_scores"] = check_judgement(res.reply, j.metrics, j.min_mean_score)
        except GateError as e:
            run.ledger.reject("judge", e.code, str(e), it.character, it.image, it.dtype)
            continue
        run.ledger.accept("judge")
        kept.append(d)
    return kept
