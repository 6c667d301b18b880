"""Stages on the images: decode check and copy into the dataset (``images``), and image information
(``annotation``) for images that came without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmrole.data.images import DEFAULT_MAX_PIXELS, ImageError, probe_image

from .asking import GenerateError
from .gates import GateError, check_annotation
from .run_state import IMAGE_EXTS, GenerationRun, sha256_file


def stage_images(run: GenerationRun) -> None:
    """Every file of the images folder: decoded (header check), copied under ``images/<folder>/``; given
    annotations (``annotations.json`` in the folder) kept. Non-images and bad images are rejected, named."""
    src = Path(run.cfg.images)
    if not src.is_dir():
        raise GenerateError(f"images: {src} is not a folder")
    subdir = run.cfg.images_subdir or src.resolve().name.replace(" ", "_")
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
                run.ledger.reject("annotation", "bad_record", f"{ann_file} record {i} has no 'image'")
                continue
            given[a["image"]] = {k: str(a.get(k) or "") for k in ("role_info", "place_info", "scene_info")}
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTS:
            if p != ann_file:  # counted, not silently skipped
                run.ledger.take("images")
                run.ledger.reject("images", "not_an_image", f"{p}: not an image file ({sorted(IMAGE_EXTS)})")
            continue
        rel_src = p.relative_to(src).as_posix()
        rel = f"{subdir}/{rel_src}"
        run.ledger.take("images")
        try:
            probe_image(p, DEFAULT_MAX_PIXELS)
        except (ImageError, OSError) as e:
            run.ledger.reject("images", "bad_image", str(e), image=rel_src)
            continue
        dest = run.out / "images" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        run.images[rel] = {"path": p, "sha": sha256_file(p), "url": None}
        if rel_src in given:
            run.annotations[rel] = given[rel_src]
        run.ledger.accept("images")


def stage_annotations(run: GenerationRun) -> None:
    """Image information (who, where, what) from the teacher for each image that came without it."""
    items = []
    for rel, info in run.images.items():
        if rel in run.annotations:
            continue
        run.ledger.take("annotation")
        items.append(
            run.asker.item("annotation", "annotation", {"image": info["sha"]}, {}, run.image_url(rel), image=rel)
        )
    results = run.asker.ask(items)
    for it in items:
        res = results[it.key]
        if run.asker.failed(it, res):
            continue  # the image stays usable, without image information
        try:
            run.annotations[it.image] = check_annotation(res.reply, run.cfg.gates)
            run.ledger.accept("annotation")
        except GateError as e:
            run.ledger.reject("annotation", e.code, str(e), image=it.image)
