"""What the stages of one generation run share: the config, the output root, the teacher (calls, cache, ledger)
and what earlier stages produced (characters, profiles, images, annotations)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .asking import TeacherAsker
from .config import CharacterSpec, GenerateConfig
from .ledger import RunLedger
from .writer import GeneratedCharacter

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


@dataclass
class GenerationRun:
    cfg: GenerateConfig
    out: Path
    asker: TeacherAsker
    ledger: RunLedger
    characters: list[CharacterSpec] = field(default_factory=list)
    profiles: dict[str, GeneratedCharacter] = field(default_factory=dict)
    images: dict[str, dict] = field(default_factory=dict)  # rel under images/ -> {path, sha, url}
    annotations: dict[str, dict] = field(default_factory=dict)

    def image_url(self, rel: str) -> Optional[str]:
        """The image as a data URL for the teacher (made once), or None when images are not sent."""
        if not self.cfg.teacher.send_images:
            return None
        info = self.images[rel]
        if info["url"] is None:
            from mmrole.eval.judges import image_data_url

            info["url"] = image_data_url(info["path"].read_bytes(), rel, self.cfg.teacher.image_max_pixels)
        return info["url"]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
