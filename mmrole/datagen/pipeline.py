"""``mmrole data generate``: characters + images + a teacher -> a dataset in the published MMRole layout.

Stages (each counted in / out / rejected with reasons; rejects go to ``rejects.jsonl`` naming the character, image
and stage): images (decode check, copy), meta_info (hypothetical characters), profile, annotation (images without
given annotations), dialogues (comment, human-role, inter-role per (character, image)), near-duplicates, test split.
Teacher calls go through an executor: :class:`LocalExecutor` (asyncio in this process) or the Ray Data one in
:mod:`mmrole.ray_datagen`; a per-item cache makes a rerun ask only for what is missing or changed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .asking import Executor, GenerateError, TeacherAsker
from .cache import TeacherCache
from .config import GenerateConfig, TeacherConfig, load_characters
from .cost import cost_usd, estimate_cost
from .ledger import RunLedger
from .run_state import IMAGE_EXTS, GenerationRun
from .stages_dialogues import stage_dialogues, stage_judge
from .stages_images import stage_annotations, stage_images
from .stages_profiles import stage_profiles
from .templates import load_gen_templates
from .writer import (
    assign_ids,
    choose_test_dialogues,
    write_annotations,
    write_dialogues,
    write_profiles,
    write_test_split,
)

__all__ = ["DataGenerator", "GenerateError"]

SUMMARY_FILE = "generate_summary.json"
REJECTS_FILE = "rejects.jsonl"


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
        self.ledger = RunLedger()
        cache = TeacherCache(Path(cfg.cache_dir) if cfg.cache_dir else self.out / ".datagen_cache")
        asker = TeacherAsker(cfg, load_gen_templates(cfg.templates), cache, self.ledger, executor_factory, progress)
        self.state = GenerationRun(cfg, self.out, asker, self.ledger)
        self.progress = progress

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
        st = self.state
        st.characters = load_characters(self.cfg.characters)
        self._prepare_out()
        stage_images(st)
        if not st.images:
            self.progress("images: no usable image")
        stage_profiles(st)
        stage_annotations(st)
        dialogues = stage_judge(st, stage_dialogues(st)) if st.images else []
        written = {c: st.profiles[c] for c in st.profiles}
        write_profiles(self.out, list(written.values()))
        write_annotations(
            self.out, [{"image": rel, **st.annotations[rel]} for rel in st.images if rel in st.annotations]
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
            "characters": sorted(self.state.profiles),
            "images": len(self.state.images),
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
                for who, t in (("teacher", self.cfg.teacher), ("judge", self.state.asker.judge_teacher))
                if who in L.usage
            },
            "rejects": len(L.rejects),
        }
        with open(self.out / REJECTS_FILE, "w", encoding="utf-8") as f:
            for r in L.rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
        return summary
