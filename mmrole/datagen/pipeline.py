"""``mmrole data generate``: characters + images + a teacher -> a dataset in the published MMRole layout.

Stages (each counted in / out / rejected with reasons; rejects go to ``rejects.jsonl`` naming the character, image
and stage): images (decode check, copy), meta_info (hypothetical characters), profile, annotation (images without
given annotations), dialogues (comment, human-role, inter-role per (character, image)), near-duplicates, test split.
Teacher calls go through an executor: :class:`LocalExecutor` (asyncio in this process) or the Ray Data one in
:mod:`mmrole.ray_datagen`; a per-item cache makes a rerun ask only for what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from mmrole.data.images import DEFAULT_MAX_PIXELS, ImageError, probe_image
from mmrole.data.records import DIALOGUE_TYPES, HYPOTHETICAL_SCRIPT

from .cache import TeacherCache, item_key
from .cards import CardError, card_to_profile, read_card
from .config import CharacterSpec, GenerateConfig, TeacherConfig, load_characters
from .cost import cost_usd, estimate_cost
from .dedup import NearDuplicateIndex
from .gates import GateError, check_annotation, check_dialogue, check_judgement, check_meta_info, check_profile
from .ledger import RunLedger
from .teacher import TeacherClient, TeacherRequest, TeacherResult
from .templates import GenTemplates, load_gen_templates
from .writer import (
    GeneratedCharacter,
    GeneratedDialogue,
    assign_ids,
    choose_test_dialogues,
    profile_markdown,
    write_annotations,
    write_dialogues,
    write_profiles,
    write_test_split,
)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
SUMMARY_FILE = "generate_summary.json"
REJECTS_FILE = "rejects.jsonl"
TYPE_STAGE = {"comment": "comment", "human-role": "human_role", "inter-role": "inter_role"}


class GenerateError(RuntimeError):
    """The run cannot start (bad output folder, no images); the message says what to fix."""


class Executor(Protocol):
    def run(self, stage: str, requests: list[TeacherRequest]) -> list[TeacherResult]: ...


class LocalExecutor:
    """Teacher calls from this process, ``teacher.max_concurrency`` in flight."""

    def __init__(self, teacher: TeacherConfig):
        self.client = TeacherClient(teacher)

    def run(self, stage: str, requests: list[TeacherRequest]) -> list[TeacherResult]:
        return self.client.call_many(requests)


@dataclass
class Item:
    """One teacher request with what it is about (for gates and reject records)."""

    stage: str  # the template stage
    ledger_stage: str  # the counted stage
    key: str
    request: TeacherRequest
    character: str = ""
    image: str = ""
    dtype: str = ""
    context: dict = field(default_factory=dict)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _with_image(messages: list, data_url: Optional[str]) -> list:
    if not data_url:
        return messages
    system, user = messages
    return [
        system,
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": user["content"]},
            ],
        },
    ]


def _info_fields(ann: Optional[dict]) -> dict:
    ann = ann or {}
    labels = {"role_info": "Who: ", "place_info": "Where: ", "scene_info": "What: "}
    return {k: (labels[k] + ann[k].strip()) if ann.get(k, "").strip() else "" for k in labels}


class DataGenerator:
    """Runs every stage of one generation run; ``run()`` returns the summary (also written to the output root)."""

    def __init__(
        self,
        cfg: GenerateConfig,
        executor_factory: Optional[Callable[[TeacherConfig], Executor]] = None,
        progress: Callable[[str], None] = lambda s: None,
    ):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.templates: GenTemplates = load_gen_templates(cfg.templates)
        self.cache = TeacherCache(Path(cfg.cache_dir) if cfg.cache_dir else self.out / ".datagen_cache")
        self.executor_factory = executor_factory or LocalExecutor
        self._executors: dict[str, Executor] = {}
        self.judge_teacher = cfg.judge.teacher or cfg.teacher
        self.progress = progress
        self.ledger = RunLedger()
        self.characters: list[CharacterSpec] = []
        self.profiles: dict[str, GeneratedCharacter] = {}
        self.images: dict[str, dict] = {}  # rel under images/ -> {path, sha, data_url}
        self.annotations: dict[str, dict] = {}

    # ------------------------------------------------------------------------------------------ teacher calls
    def _executor(self, teacher: TeacherConfig) -> Executor:
        if teacher.identity not in self._executors:
            self._executors[teacher.identity] = self.executor_factory(teacher)
        return self._executors[teacher.identity]

    def _item(
        self, stage: str, ledger_stage: str, inputs: dict, fields: dict, image_url=None, variant=0, **ctx
    ) -> Item:
        prompt = self.templates[stage]
        teacher = self.judge_teacher if stage == "judge_dialogue" else self.cfg.teacher
        key = item_key(stage, {**inputs, "variant": variant}, teacher.identity, prompt.digest)
        messages = _with_image(prompt.render(**fields), image_url if self.cfg.teacher.send_images else None)
        req = TeacherRequest(key, messages, stage, prompt.schema, seed_offset=variant)
        return Item(stage, ledger_stage, key, req, **ctx)

    def ask(self, items: list[Item], who: str = "teacher") -> dict[str, TeacherResult]:
        """Results per item key: from the cache, else from the teacher (successful replies are cached)."""
        teacher = self.judge_teacher if who == "judge" else self.cfg.teacher
        self.ledger.count(who)
        results: dict[str, TeacherResult] = {}
        todo: list[Item] = []
        for it in items:
            hit = self.cache.get(it.stage, it.key)
            if hit is not None:
                results[it.key] = TeacherResult(key=it.key, reply=hit.get("reply"), text=hit.get("text", ""))
                self.ledger.count(who, cache_hits=1)
            else:
                todo.append(it)
        if todo:
            self.progress(f"{todo[0].ledger_stage}: {len(todo)} teacher requests ({len(items) - len(todo)} cached)")
            unique = {it.key: it for it in todo}
            got = self._executor(teacher).run(todo[0].ledger_stage, [it.request for it in unique.values()])
            for it, res in zip(unique.values(), got):
                self.ledger.count(
                    who,
                    requests=1,
                    http_attempts=res.http_attempts,
                    prompt_tokens=res.prompt_tokens,
                    completion_tokens=res.completion_tokens,
                )
                results[it.key] = res
                if res.ok:
                    self.cache.put(it.stage, it.key, {"reply": res.reply, "text": res.text})
        return results

    def _failed(self, it: Item, res: TeacherResult) -> bool:
        """Record a request that gave no usable JSON; True when it failed."""
        if res.ok:
            return False
        self.ledger.reject(it.ledger_stage, res.error_code or "error", res.error, it.character, it.image, it.dtype)
        return True

    # ------------------------------------------------------------------------------------------ stages
    def stage_images(self) -> None:
        src = Path(self.cfg.images)
        if not src.is_dir():
            raise GenerateError(f"images: {src} is not a folder")
        subdir = self.cfg.images_subdir or src.resolve().name.replace(" ", "_")
        given: dict = {}
        ann_file = src / "annotations.json"
        if ann_file.exists():
            try:
                data = json.loads(ann_file.read_text(encoding="utf-8"))
                if not isinstance(data, list):
                    raise ValueError("expected a list of {image, role_info, place_info, scene_info}")
            except (ValueError, OSError) as e:
                raise GenerateError(f"{ann_file}: {e}") from e
            for i, a in enumerate(data):
                if not isinstance(a, dict) or not isinstance(a.get("image"), str):
                    self.ledger.reject("annotation", "bad_record", f"{ann_file} record {i} has no 'image'")
                    continue
                given[a["image"]] = {k: str(a.get(k) or "") for k in ("role_info", "place_info", "scene_info")}
        files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
        for p in files:
            if p.suffix.lower() not in IMAGE_EXTS:
                if p != ann_file:  # counted, not silently skipped
                    self.ledger.take("images")
                    self.ledger.reject("images", "not_an_image", f"{p}: not an image file ({sorted(IMAGE_EXTS)})")
                continue
            rel_src = p.relative_to(src).as_posix()
            rel = f"{subdir}/{rel_src}"
            self.ledger.take("images")
            try:
                probe_image(p, DEFAULT_MAX_PIXELS)
            except (ImageError, OSError) as e:
                self.ledger.reject("images", "bad_image", str(e), image=rel_src)
                continue
            dest = self.out / "images" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
            self.images[rel] = {"path": p, "sha": _sha256_file(p), "url": None}
            if rel_src in given:
                self.annotations[rel] = given[rel_src]
            self.ledger.accept("images")

    def _image_url(self, rel: str) -> Optional[str]:
        if not self.cfg.teacher.send_images:
            return None
        info = self.images[rel]
        if info["url"] is None:
            from mmrole.eval.judges import image_data_url

            info["url"] = image_data_url(info["path"].read_bytes(), rel, self.cfg.teacher.image_max_pixels)
        return info["url"]

    def stage_profiles(self) -> None:
        gates = self.cfg.gates
        meta: dict[str, dict] = {}
        items = []
        for c in self.characters:
            if c.is_hypothetical and not c.card:
                self.ledger.take("meta_info")
                fields = {"name": c.name, "brief": c.brief or "(none)", "language": c.language}
                items.append(
                    self._item("meta_info", "meta_info", fields, fields, character=c.name, context={"spec": c})
                )
        results = self.ask(items)
        for it in items:
            res = results[it.key]
            if self._failed(it, res):
                continue
            try:
                meta[it.character] = check_meta_info(res.reply, it.character, it.context["spec"].language, gates)
                self.ledger.accept("meta_info")
            except GateError as e:
                self.ledger.reject("meta_info", e.code, str(e), it.character)
        items = []
        for c in self.characters:
            self.ledger.take("profile")
            script = HYPOTHETICAL_SCRIPT if c.is_hypothetical else c.source
            if c.card:
                try:
                    card = read_card(c.card)
                except CardError as e:
                    self.ledger.reject("profile", "bad_card", str(e), c.name)
                    continue
                md, structured = card_to_profile(card, c.language)
                self.profiles[c.name] = GeneratedCharacter(
                    c.name, script, c.group, c.language, md, structured, first_message=structured["first_message"]
                )
                self.ledger.accept("profile")
                continue
            if c.is_hypothetical:
                if c.name not in meta:
                    self.ledger.reject(
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
                self._item(
                    stage,
                    "profile",
                    fields,
                    fields,
                    character=c.name,
                    context={"spec": c, "script": script, "meta": meta.get(c.name)},
                )
            )
        results = self.ask(items)
        for it in items:
            res = results[it.key]
            if self._failed(it, res):
                continue
            c = it.context["spec"]
            try:
                sections = check_profile(res.reply, c.language, gates)
            except GateError as e:
                self.ledger.reject("profile", e.code, str(e), c.name)
                continue
            self.profiles[c.name] = GeneratedCharacter(
                c.name,
                it.context["script"],
                c.group,
                c.language,
                profile_markdown(sections, c.language),
                sections,
                it.context["meta"],
            )
            self.ledger.accept("profile")

    def stage_annotations(self) -> None:
        items = []
        for rel, info in self.images.items():
            if rel in self.annotations:
                continue
            self.ledger.take("annotation")
            items.append(
                self._item("annotation", "annotation", {"image": info["sha"]}, {}, self._image_url(rel), image=rel)
            )
        results = self.ask(items)
        for it in items:
            res = results[it.key]
            if self._failed(it, res):
                continue  # the image stays usable, without image information
            try:
                self.annotations[it.image] = check_annotation(res.reply, self.cfg.gates)
                self.ledger.accept("annotation")
            except GateError as e:
                self.ledger.reject("annotation", e.code, str(e), image=it.image)

    def _partner(self, c: CharacterSpec) -> Optional[str]:
        if c.partner:
            return c.partner
        names = [x.name for x in self.characters]
        i = names.index(c.name)
        for j in range(1, len(names)):
            other = names[(i + j) % len(names)]
            if other in self.profiles:
                return other
        return None

    def stage_dialogues(self) -> list[GeneratedDialogue]:
        counts = self.cfg.dialogues.per_type()
        items = []
        for c in self.characters:
            for rel in self.images:
                for dtype in DIALOGUE_TYPES:
                    for n in range(counts[dtype]):
                        self.ledger.take("dialogues")
                        ch = self.profiles.get(c.name)
                        if ch is None:
                            self.ledger.reject(
                                "dialogues",
                                "no_profile",
                                "the character has no profile (see the profile stage)",
                                c.name,
                                rel,
                                dtype,
                            )
                            continue
                        ann = self.annotations.get(rel)
                        fields = {
                            "name": c.name,
                            "source": ch.script,
                            "language": c.language,
                            "profile": ch.profile,
                            **_info_fields(ann),
                        }
                        if ch.first_message and dtype == "human-role":
                            fields["seed"] = (
                                f"For the voice of {c.name}, this is how they once opened a conversation: {ch.first_message}"
                            )
                        partner = None
                        if dtype == "inter-role":
                            partner = self._partner(c)
                            if partner is None or partner not in self.profiles:
                                self.ledger.reject(
                                    "dialogues",
                                    "no_partner",
                                    f"no partner with a profile for an inter-role dialogue (partner {partner!r})",
                                    c.name,
                                    rel,
                                    dtype,
                                )
                                continue
                            p = self.profiles[partner]
                            fields.update(partner=p.name, partner_source=p.script, partner_profile=p.profile)
                        inputs = {**fields, "image": self.images[rel]["sha"]}
                        items.append(
                            self._item(
                                TYPE_STAGE[dtype],
                                "dialogues",
                                inputs,
                                fields,
                                self._image_url(rel),
                                variant=n,
                                character=c.name,
                                image=rel,
                                dtype=dtype,
                                context={"partner": partner, "ann": ann},
                            )
                        )
        results = self.ask(items)
        out = []
        dedup = NearDuplicateIndex(self.cfg.gates.near_duplicate_jaccard)
        for it in items:
            res = results[it.key]
            if self._failed(it, res):
                continue
            ch = self.profiles[it.character]
            try:
                turns = check_dialogue(
                    res.reply, it.dtype, it.character, it.context["partner"], ch.language, self.cfg.gates
                )
            except GateError as e:
                self.ledger.reject("dialogues", e.code, str(e), it.character, it.image, it.dtype)
                continue
            self.ledger.accept("dialogues")
            self.ledger.take("near_duplicates")
            text = "\n".join(t for s, t in turns if s == it.character)
            dup = dedup.check_and_add(it.character, f"{it.image}/{it.dtype}", text)
            if dup is not None:
                self.ledger.reject(
                    "near_duplicates",
                    "near_duplicate",
                    f"{dup[1]:.2f} Jaccard similarity with the dialogue on {dup[0]}",
                    it.character,
                    it.image,
                    it.dtype,
                )
                continue
            self.ledger.accept("near_duplicates")
            out.append(GeneratedDialogue(it.character, ch.group, it.dtype, it.image, it.context["ann"], turns))
        return out

    def stage_judge(self, dialogues: list[GeneratedDialogue]) -> list[GeneratedDialogue]:
        """Optional: a judge rates each kept dialogue on the role-playing metrics; low means are rejected."""
        j = self.cfg.judge
        if not j.enabled:
            return dialogues
        items = []
        for n, d in enumerate(dialogues):
            self.ledger.take("judge")
            ch = self.profiles[d.owner]
            text = "\n".join(f"{s}: {t}" for s, t in d.turns)
            fields = {"name": d.owner, "source": ch.script, "profile": ch.profile, "dialogue": text}
            fields["metrics"] = ", ".join(j.metrics)
            items.append(
                self._item(
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
        results = self.ask(items, who="judge")
        kept = []
        for it in items:
            res = results[it.key]
            if self._failed(it, res):
                continue
            d = dialogues[it.context["n"]]
            try:
                d.extra["judge_scores"] = check_judgement(res.reply, j.metrics, j.min_mean_score)
            except GateError as e:
                self.ledger.reject("judge", e.code, str(e), it.character, it.image, it.dtype)
                continue
            self.ledger.accept("judge")
            kept.append(d)
        return kept

    # ------------------------------------------------------------------------------------------ the run
    def _prepare_out(self) -> None:
        if self.out.exists() and (self.out / "profiles").exists() and not (self.out / SUMMARY_FILE).exists():
            raise GenerateError(
                f"out: {self.out} holds a dataset that `mmrole data generate` did not write; choose an empty folder"
            )
        for sub in ("profiles", "dialogues", "data/test"):
            shutil.rmtree(self.out / sub, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)

    def estimate(self) -> dict:
        """The cost estimate of this run before any call (calls x assumed tokens)."""
        chars = load_characters(self.cfg.characters)
        src = Path(self.cfg.images)
        n_images = (
            sum(1 for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS) if src.is_dir() else 0
        )
        hypo = sum(c.is_hypothetical and not c.card for c in chars)
        cards = sum(bool(c.card) for c in chars)
        est = estimate_cost(len(chars), hypo, n_images, n_images, self.cfg.dialogues, self.cfg.teacher, cards)
        return est.to_dict()

    def run(self) -> dict:
        self.characters = load_characters(self.cfg.characters)
        self._prepare_out()
        self.stage_images()
        if not self.images:
            self.progress("images: no usable image")
        self.stage_profiles()
        self.stage_annotations()
        dialogues = self.stage_judge(self.stage_dialogues()) if self.images else []
        written = {c: self.profiles[c] for c in self.profiles}
        write_profiles(self.out, list(written.values()))
        write_annotations(
            self.out, [{"image": rel, **self.annotations[rel]} for rel in self.images if rel in self.annotations]
        )
        assign_ids(dialogues)
        choose_test_dialogues(dialogues, self.cfg.dialogues.test_per_character_type)
        files = write_dialogues(self.out, dialogues)
        held = {d.id for d in dialogues if d.held_out}
        for _ in held:
            self.ledger.take("test_split")
        test = write_test_split(self.out, held, self.cfg.seed) if held else {}
        n_test = sum(test.values())
        self.ledger.stages["test_split"].out = n_test
        if n_test < len(held):
            self.ledger.reject("test_split", "not_rendered", f"{len(held) - n_test} held-out dialogues gave no sample")
        return self._finish(files, test)

    def _finish(self, files: dict, test: dict) -> dict:
        L = self.ledger
        stages = {k: v.to_dict() for k, v in L.stages.items()}
        empty = [k for k, v in stages.items() if v["in"] > 0 and v["out"] == 0]
        if stages["dialogues"]["out"] == 0 and "dialogues" not in empty:
            empty.append("dialogues")
        summary = {
            "out": str(self.out.resolve()),
            "characters": sorted(self.profiles),
            "images": len(self.images),
            "stages": stages,
            "stages_with_nothing_usable": empty,
            "ok": not empty,
            "dialogue_files": files,
            "test_split": test,
            **{
                who: {
                    "model": t.model,
                    "base_url": t.base_url,
                    **L.usage[who],
                    "cost_usd": round(cost_usd(L.usage[who]["prompt_tokens"], L.usage[who]["completion_tokens"], t), 4),
                }
                for who, t in (("teacher", self.cfg.teacher), ("judge", self.judge_teacher))
                if who in L.usage
            },
            "rejects": len(L.rejects),
        }
        with open(self.out / REJECTS_FILE, "w", encoding="utf-8") as f:
            for r in L.rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
        return summary
