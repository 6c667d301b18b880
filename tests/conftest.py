"""Shared fixtures: the real MMRole sample slice and a generated demo dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mmrole_sample_dir() -> Path:
    """``../shared/mmrole-sample`` beside the repo (or $MMROLE_SAMPLE_DIR)."""
    return Path(os.environ.get("MMROLE_SAMPLE_DIR", REPO.parent / "shared" / "mmrole-sample"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The published data slice. Missing: fail under CI (CI has it), skip on a bare laptop."""
    d = mmrole_sample_dir()
    if not (d / "profiles").is_dir():
        msg = f"MMRole sample data not found at {d} (set MMROLE_SAMPLE_DIR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A freshly generated demo dataset (published layout)."""
    from mmrole.data.demo import build_demo

    root = tmp_path_factory.mktemp("demo") / "MMRole_dataset"
    build_demo(root, seed=0)
    return root


@pytest.fixture(scope="session")
def demo_prepared(demo_root, tmp_path_factory) -> Path:
    """The demo dataset prepared into Parquet shards."""
    from mmrole.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "demo"
    prepare(demo_root, out)
    return out
