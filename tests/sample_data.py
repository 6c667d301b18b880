"""Where the real MMRole sample slice is (``../shared/mmrole-sample`` or $MMROLE_SAMPLE_DIR).

A test that needs it fails under CI (which has it) and skips on a bare laptop.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mmrole_sample_dir() -> Path:
    return Path(os.environ.get("MMROLE_SAMPLE_DIR", REPO.parent / "shared" / "mmrole-sample"))


def require(path: Path) -> Path:
    if not path.exists():
        msg = f"MMRole sample data not found at {path} (set MMROLE_SAMPLE_DIR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def sample_eval_dir() -> Path:
    """The published eval/ folder of the sample (answers, reviews, results of three models)."""
    return require(mmrole_sample_dir() / "eval")


def paper_roleplay_template() -> Path:
    """The original paper's role-play wording as a template (kept with the sample, not in this repository)."""
    return require(mmrole_sample_dir() / "original" / "paper_roleplay.yaml")
