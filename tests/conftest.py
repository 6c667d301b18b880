"""Shared fixtures: the real MMRole sample slice and a generated demo dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmrole.ray_env import default_torch_extensions_dir

REPO = Path(__file__).resolve().parents[1]

# Offline, CPU DeepSpeed, and a persistent cache for DeepSpeed's first-use op build (~30 s once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The published data slice. Missing: fail under CI (CI has it), skip on a bare laptop."""
    from sample_data import mmrole_sample_dir, require

    return require(mmrole_sample_dir() / "profiles").parent


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A freshly generated demo dataset (published layout)."""
    from mmrole.data.demo import build_demo
    from mmrole.train.rm_data import demo_rm_builder

    root = tmp_path_factory.mktemp("demo") / "MMRole_dataset"
    build_demo(root, seed=0, rm_builder=demo_rm_builder)
    return root


@pytest.fixture(scope="session")
def demo_prepared(demo_root, tmp_path_factory) -> Path:
    """The demo dataset prepared into Parquet shards."""
    from mmrole.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "demo"
    prepare(demo_root, out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random-weight models: an agent (Qwen2.5-VL family) and a judge (Qwen2-VL family)."""
    from mmrole.models import make_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "agent": str(make_tiny_vlm(root / "agent", family="qwen2_5_vl", seed=0)),
        "judge": str(make_tiny_vlm(root / "judge", family="qwen2_vl", seed=1)),
    }


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for one test module (4 logical CPUs on 2 cores: see cpu-stack-notes, starvation)."""
    import ray

    from mmrole.ray_env import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()
