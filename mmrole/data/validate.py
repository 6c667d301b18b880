"""``mmrole data validate``: check a dataset root and count what it holds."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .images import DEFAULT_MAX_PIXELS, ImageError, probe_image, resolve_image_path
from .reader import Problem, load_dataset
from .records import HUMAN_SPEAKER
from .render import RenderStats, expand_dialogue
from .templates import load_roleplay_template


@dataclass
class ValidationReport:
    root: str
    counts: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list:
        return [p for p in self.problems if p.level == "warning"]

    def ok(self, strict: bool = False) -> bool:
        return not self.errors and (not strict or not self.warnings)

    def to_json(self) -> dict:
        return {
            "root": self.root,
            "counts": self.counts,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.__dict__ for p in self.problems],
        }


def _is_coco(rel: str) -> bool:
    return rel.startswith("COCO/")


def validate(
    root: Union[str, Path],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
    template: Optional[str] = None,
) -> ValidationReport:
    """Check layout, JSON, images and speakers; count characters, images, dialogues, samples and tests."""
    ds = load_dataset(root)
    rep = ValidationReport(root=str(Path(root).resolve()))
    t = load_roleplay_template(template)
    stats = RenderStats()
    dialogues = Counter()
    images: dict[str, list[str]] = {}  # image -> ids referencing it (first few)
    for d in ds.iter_dialogues():
        dialogues[f"{d.group}/{d.type}"] += 1
        images.setdefault(d.image.path, []).append(d.id)
        for sp in d.speakers:
            if sp != HUMAN_SPEAKER and sp not in ds.characters:
                ds.problems.append(
                    Problem("error", d.source_file, d.id, "unknown_speaker", f"speaker {sp!r} has no profile")
                )
        for _ in expand_dialogue(d, ds.characters, t, stats):
            pass
    for r in stats.rejects:
        if r["code"] in ("empty_dialogue", "unanswered", "empty_target", "human_target", "no_prompt", "empty_prompt"):
            ds.problems.append(Problem("warning", r["file"], r["id"], r["code"], r["reason"]))
    test = Counter()
    for s in ds.iter_test_samples():
        test[f"{s.group}/{s.dialogue_type}"] += 1
        images.setdefault(s.image, []).append(s.id)
    for a in ds.annotations:
        images.setdefault(a, [])
    missing_coco = 0
    checked = 0
    for rel, ids in sorted(images.items()):
        where = ids[0] if ids else "annotations.json"
        try:
            path = resolve_image_path(ds.images_root, rel)
        except ImageError as e:
            ds.problems.append(Problem("error", str(ds.images_root), where, "bad_image_path", str(e)))
            continue
        if not path.is_file():
            if _is_coco(rel):
                missing_coco += 1  # users download COCO separately: a warning, summarised below
            else:
                ds.problems.append(Problem("error", str(path), where, "missing_image", "image file not found"))
            continue
        if check_images:
            try:
                probe_image(path, max_pixels)
                checked += 1
            except ImageError as e:
                ds.problems.append(Problem("error", str(path), where, "bad_image", str(e)))
    if missing_coco:
        ds.problems.append(
            Problem(
                "warning",
                str(ds.images_root / "COCO"),
                "",
                "missing_coco",
                f"{missing_coco} COCO images are not present (download MS-COCO train2017 into images/COCO/train2017/)",
            )
        )
    chars = Counter(f"{c.group}/{c.kind}" for c in ds.characters.values())
    rep.counts = {
        "characters": len(ds.characters),
        "characters_by_group_kind": dict(sorted(chars.items())),
        "characters_by_language": dict(Counter(c.language for c in ds.characters.values())),
        "images_referenced": len(images),
        "images_checked": checked,
        "images_missing_coco": missing_coco,
        "dialogues": dict(sorted(dialogues.items())),
        "dialogues_total": sum(dialogues.values()),
        "samples_rendered": stats.samples_out,
        "samples_by_reason_rejected": stats.rejected_by_reason,
        "test_samples": dict(sorted(test.items())),
        "test_samples_total": sum(test.values()),
    }
    rep.problems = ds.problems
    return rep
