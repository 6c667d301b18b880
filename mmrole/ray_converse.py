"""Ray glue of ``mmrole eval converse``: conversations held turn by turn as Ray Data pipelines over actor pools (one
pipeline per turn, batched across conversations and models). Judging, the report and the whole job:
:mod:`mmrole.ray_converse_judging`.

The driver owns the stores (append-only JSON lines under ``<out>/converse/``): each finished turn is appended once,
so a stopped run resumes at the last finished turn of every conversation and redoes none.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from mmrole.eval.converse import (
    PARTNER,
    Cast,
    Conversation,
    TurnRecord,
    agent_participant,
    lead_partner_turn,
    replay_key,
    restore,
)
from mmrole.eval.converse_config import ConverseJobConfig
from mmrole.ray_eval import pool_args, progress_bar

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


def converse_dir(cfg: ConverseJobConfig) -> Path:
    return Path(cfg.out) / "converse"


# ----------------------------------------------------------------------------------------------- the cast
def build_cast(cfg: ConverseJobConfig, log: Log = _log):
    """The items, the cast and where the images are, from the prepared split and its dataset root. No Ray."""
    from mmrole.data.prepared import images_root, iter_samples, load_manifest
    from mmrole.data.reader import load_dataset
    from mmrole.data.templates import load_roleplay_template
    from mmrole.eval.cache_keys import agent_identity, digest
    from mmrole.eval.converse import build_items
    from mmrole.eval.converse_templates import load_partner_template

    root = cfg.dataset_root or load_manifest(cfg.data).get("dataset_root")
    if not root:
        raise ValueError(f"{cfg.data}/manifest.json names no dataset_root; set dataset_root=PATH")
    ds = load_dataset(root)
    dialogues = {d.id: d for d in ds.iter_dialogues()}
    partner_t = load_partner_template(cfg.templates.partner)
    items, stats = build_items(
        iter_samples(cfg.data, "test"),
        dialogues,
        ds.characters,
        partner_t,
        types=cfg.types,
        seed=cfg.seed,
        max_items=cfg.max_items,
    )
    log(f"[converse] items: {json.dumps(stats.to_dict(), ensure_ascii=False)[:1500]}")
    digests = {agent_participant(m.name): digest(agent_identity(asdict(m.agent), cfg.generation)) for m in cfg.models}
    digests[PARTNER] = digest(agent_identity(asdict(cfg.partner), cfg.partner_generation))
    cast = Cast(ds.characters, load_roleplay_template(cfg.templates.roleplay), partner_t, digests)
    return items, stats, cast, str(images_root(cfg.data))


def _store(cfg: ConverseJobConfig, model: str):
    from mmrole.eval.store import JsonlStore

    return JsonlStore(converse_dir(cfg) / "conversations" / f"{model}.jsonl")


def load_conversations(cfg: ConverseJobConfig, items, cast: Cast, log: Log = _log) -> dict[str, list[Conversation]]:
    """Every model's conversations as stored (resumed at the last reusable turn). The first model is restored
    first: with shared partner turns the others' partner turns are checked against its."""
    convs: dict[str, list[Conversation]] = {}
    lead_by_item: dict[str, Conversation] = {}
    shared = cfg.partner_turns == "shared"
    for mi, m in enumerate(cfg.models):
        records: dict[str, list[TurnRecord]] = defaultdict(list)
        for _, rec in _store(cfg, m.name).read_records()[0]:
            r = TurnRecord.from_dict(rec)
            records[r.conv].append(r)
        out, stale = [], 0
        for item in items:
            c = Conversation(item, m.name)
            lead = lead_by_item.get(item.id) if shared and mi > 0 else None
            stale += restore(cast, c, records.get(item.id, []), lead=lead, retry_failed=cfg.retry_failed)
            _keep_turns(c, cfg.turns)
            if mi == 0:
                lead_by_item[item.id] = c
            out.append(c)
        if stale:
            log(
                f"[converse] {m.name}: {stale} stored turn(s) not reused (another agent, partner, template or a failure)"
            )
        convs[m.name] = out
    return convs


def _keep_turns(conv: Conversation, turns: int) -> None:
    """A conversation stored with more agent turns than this run asks for is used up to its ``turns``-th (a
    larger ``turns`` extends the stored ones instead)."""
    n = 0
    for i, t in enumerate(conv.turns):
        n += t.speaker == "agent" and not t.error
        if n == turns:
            del conv.turns[i + 1 :]
            return


# ------------------------------------------------------------------------------------------------ workers
class ConverseWorker:
    """A replica holding the participants of one turn (agents under test and/or the partner): a batch of Sample
    rows, each naming its participant, -> replies or per-row errors (ray_eval's AnswerWorker per participant)."""

    def __init__(self, participants: dict, images_root: str):
        from mmrole.ray_eval import AnswerWorker

        self.workers = {
            name: AnswerWorker(p["agent"], p["generation"], images_root) for name, p in participants.items()
        }

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        answers, errors = [""] * n, [""] * n
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(batch["participant"]):
            groups[str(p)].append(i)
        for name, idx in groups.items():
            sub = {k: [batch[k][i] for i in idx] for k in batch if k != "participant"}
            res = self.workers[name](sub)
            for j, i in enumerate(idx):
                answers[i], errors[i] = str(res["answer"][j]), str(res["error"][j])
        return {
            "id": np.array([str(x) for x in batch["id"]], dtype=object),
            "answer": np.array(answers, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def conversation_finished(conv: Conversation, turns: int) -> bool:
    return bool(conv.ended) or conv.agent_turns >= turns


def run_converse(
    cfg: ConverseJobConfig,
    log: Log = _log,
    stop_after: Optional[int] = None,
    start_ray: Optional[Callable[[], None]] = None,
) -> dict:
    """Hold every conversation to ``cfg.turns`` agent turns, resuming what the stores hold. One Ray Data pipeline
    per turn, across all conversations and models that need that speaker; nothing to do starts no Ray.
    ``stop_after`` stops once that many new turns are stored (tests of resume)."""
    t0 = time.perf_counter()
    items, item_stats, cast, images = build_cast(cfg, log)
    convs = load_conversations(cfg, items, cast, log)
    stores = {m.name: _store(cfg, m.name) for m in cfg.models}
    lead_name = cfg.models[0].name
    shared = cfg.partner_turns == "shared"
    lead_by_item = {c.item.id: c for c in convs[lead_name]}
    settings = {agent_participant(m.name): m.agent for m in cfg.models}
    settings[PARTNER] = cfg.partner
    generation = {PARTNER: cfg.partner_generation}
    started = False
    n_new = Counter()
    n_generated = 0
    reused = {m: sum(len(c.turns) for c in cs) for m, cs in convs.items()}
    for m, cs in convs.items():
        log(f"[converse] {m}: {len(cs)} conversations, {reused[m]} turns already stored")
    bar = None
    try:
        while True:
            # Turns that need no model: the test dialogue's opening, partner turns copied from the first model.
            copied: dict[str, list[TurnRecord]] = defaultdict(list)
            rows, pending = [], {}
            for m in cfg.models:
                for c in convs[m.name]:
                    while not conversation_finished(c, cfg.turns):
                        i, speaker = len(c.turns), cast.next_speaker(c)
                        name = cast.speaker_name(c.item, speaker)
                        if speaker == "partner" and i == 0 and c.item.opening is not None:
                            key = cast.expected_key(c, 0, "partner", PARTNER)
                            rec = TurnRecord(
                                c.item.id, m.name, 0, "partner", name, c.item.opening, "", "opening", -1, key
                            )
                        elif speaker == "partner" and shared and m.name != lead_name:
                            lead = lead_by_item[c.item.id]
                            t = lead_partner_turn(lead, i)
                            if t is None:
                                if conversation_finished(lead, cfg.turns) or len(lead.turns) > i:
                                    c.ended = f"turn {i}: no partner turn to copy ({lead_name}'s conversation ended)"
                                break  # else: the lead's partner speaks in this pipeline; copy it next round
                            rec = TurnRecord(
                                c.item.id,
                                m.name,
                                i,
                                "partner",
                                name,
                                t.text,
                                "",
                                f"replay:{lead_name}",
                                -1,
                                replay_key(t.cache_key),
                            )
                        else:
                            participant = agent_participant(m.name) if speaker == "agent" else PARTNER
                            s = cast.agent_sample(c) if speaker == "agent" else cast.partner_sample(c)
                            key = cast.expected_key(c, i, speaker, participant)
                            row = s.to_row()
                            row["participant"] = participant
                            rows.append(row)
                            pending[s.id] = (c, i, speaker, name, key)
                            break
                        c.turns.append(rec)
                        copied[m.name].append(rec)
            for m, recs in copied.items():
                stores[m].append_records([r.to_dict() for r in recs])
                n_new[m] += len(recs)
            if not rows:
                if not copied:
                    break
                continue
            if not started:
                if start_ray is not None:
                    start_ray()
                started = True
                total = sum(
                    cfg.turns * 2 - len(c.turns)
                    for cs in convs.values()
                    for c in cs
                    if not conversation_finished(c, cfg.turns)
                )
                bar = progress_bar(total, "conversations (turns)", cfg.progress)
            # Each batch's turns are stored as they arrive: a run stopped mid-pipeline keeps every finished turn.
            for fresh in _run_turn(cfg, rows, settings, generation, images):
                by_model: dict[str, list[TurnRecord]] = defaultdict(list)
                for sid, (answer, error) in fresh.items():
                    c, i, speaker, name, key = pending[sid]
                    agent_turn = sum(t.speaker == "agent" for t in c.turns) if speaker == "agent" else -1
                    rec = TurnRecord(c.item.id, c.model, i, speaker, name, answer, error, "generated", agent_turn, key)
                    if not error and not answer.strip():
                        rec.error = "empty reply"
                    c.turns.append(rec)
                    if rec.error:
                        c.ended = f"turn {i} ({speaker}) failed: {rec.error}"
                    by_model[c.model].append(rec)
                for m, recs in by_model.items():
                    stores[m].append_records([r.to_dict() for r in recs])
                    n_new[m] += len(recs)
                n_generated += len(fresh)
                if bar is not None:
                    bar.update(len(fresh))
                else:
                    log(f"[converse] {n_generated} turns generated")
                if stop_after is not None and n_generated >= stop_after:
                    log("[converse] stopping early (stop_after)")
                    return {"stopped": True, "generated": n_generated}
    finally:
        if bar is not None:
            bar.close()
    summary = {"items": item_stats.to_dict(), "models": {}, "seconds": 0.0}
    for m, cs in convs.items():
        ended = Counter(c.ended.split(":")[0] if c.ended else "" for c in cs if c.ended)
        summary["models"][m] = {
            "conversations": len(cs),
            "complete": sum(c.agent_turns >= cfg.turns for c in cs),
            "ended_early": sum(bool(c.ended) for c in cs),
            "ended_reasons": [c.ended for c in cs if c.ended][:20],
            "ended_by": dict(ended),
            "turns_stored": sum(len(c.turns) for c in cs),
            "turns_new": n_new[m],
            "turns_reused": reused[m],
        }
    summary["generated_now"] = n_generated
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"[converse] done: {json.dumps(summary, ensure_ascii=False, default=str)[:3000]}")
    return summary


def _run_turn(cfg: ConverseJobConfig, rows: list[dict], settings: dict, generation: dict, images: str):
    """One pipeline; yields, batch by batch as they finish, ``{row id: (answer, error)}`` (each row once)."""
    import ray

    needed = sorted({r["participant"] for r in rows})
    participants = {
        p: {"agent": asdict(settings[p]), "generation": asdict(generation.get(p, cfg.generation))} for p in needed
    }
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // max(1, cfg.pool.batch_size), 256)))
    ds = ds.map_batches(
        ConverseWorker,
        fn_constructor_kwargs=dict(participants=participants, images_root=images),
        **pool_args(cfg.pool),
    )
    seen: set[str] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        fresh = {}
        for i, a, e in zip(batch["id"], batch["answer"], batch["error"]):
            if str(i) not in seen:  # a block retried after a lost replica delivers its rows again
                seen.add(str(i))
                fresh[str(i)] = (str(a), str(e))
        if fresh:
            yield fresh
    missing = {r["id"] for r in rows} - seen
    if missing:
        raise RuntimeError(f"converse: the pipeline lost {len(missing)} turn(s): {sorted(missing)[:5]}")
