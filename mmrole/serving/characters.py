"""What an app serves from its dataset: the characters (for role-play and the page) and a few annotated images
(for the page's image picker), loaded once at replica start."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmrole.data.records import Character, ImageRef

MAX_LISTED_IMAGES = 200  # the page's picker shows a sample, not thousands


@dataclass
class DatasetAssets:
    """Characters by name, annotated images by dataset path (files that exist), and the temp dir to delete at
    shutdown (the generated demo dataset) or None."""

    characters: dict[str, Character] = field(default_factory=dict)
    images: dict[str, tuple[Path, ImageRef]] = field(default_factory=dict)
    tmp_dir: Optional[str] = None


def load_dataset_assets(root: Optional[str]) -> DatasetAssets:
    """Characters and images of a dataset root ("demo": the generated demo dataset, written to a temp dir)."""
    if not root:
        return DatasetAssets()
    from mmrole.data.reader import load_dataset

    tmp = None
    if root == "demo":
        from mmrole.data.demo import build_demo

        tmp = tempfile.mkdtemp(prefix="mmrole-demo-")
        root = f"{tmp}/MMRole_dataset"
        build_demo(root, seed=0)
    ds = load_dataset(root)
    images: dict[str, tuple[Path, ImageRef]] = {}
    for key, ref in sorted(ds.annotations.items()):
        path = ds.images_root / key
        if path.is_file():
            images[key] = (path, ref)
        if len(images) >= MAX_LISTED_IMAGES:
            break
    return DatasetAssets(dict(ds.characters), images, tmp)


def load_characters(root: Optional[str]) -> tuple[dict[str, Character], Optional[str]]:
    """name -> Character of a dataset root, and the temp dir to delete later (or None)."""
    assets = load_dataset_assets(root)
    return assets.characters, assets.tmp_dir
