"""Shared fixtures: the real MMRole sample slice, a generated demo dataset, tiny models, one Ray for the session and
one Serve stack."""

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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``exclusive_ray`` start a Ray cluster of their own in this process, which ends the session's
    shared one: they run last, so every other Ray test shares one Ray (and one Serve stack)."""
    items.sort(key=lambda item: item.get_closest_marker("exclusive_ray") is not None)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (4 logical CPUs on 2 cores: see cpu-stack-notes, starvation),
    started by the first module that needs it: each Ray start and its warm workers cost seconds."""
    import ray

    from mmrole.ray_env import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(ray_session):
    """The session's local Ray, for a test module."""
    assert ray_session.is_initialized(), "the shared Ray was shut down by a test not marked exclusive_ray"
    return ray_session


SERVE_TOKEN = "test-token-6c1f"  # the judge app's bearer token (the agent app runs without auth)


@pytest.fixture(scope="session")
def serve_stack(ray_session, demo_root, tmp_path_factory):
    """Ray Serve on 127.0.0.1 (a free port) with both apps on tiny models, shared by every test that talks to our
    Serve endpoints: the agent (auth off, a LoRA adapter multiplexed) under /agent and the judge (auth on, a small
    queue for the overload test) under /judge. tests/test_serve.py's last test deletes the agent app (graceful
    shutdown): modules that use the agent sort before it."""
    import socket
    import sys

    from ray import serve

    from mmrole.models import LoRASettings, VLMConfig, build_vlm, make_tiny_vlm

    if str(REPO) not in sys.path:  # `serve` (the apps) is a top-level folder of the repo, not an installed package
        sys.path.insert(0, str(REPO))
    from serve import agent_app, judge_app

    tiny = make_tiny_vlm(tmp_path_factory.mktemp("tiny") / "agent", family="qwen2_5_vl", seed=0)
    lora = build_vlm(VLMConfig(model_path=str(tiny), device="cpu", lora=LoRASettings(r=4))).save(
        tmp_path_factory.mktemp("lora") / "nova-lora"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model = {"model_path": str(tiny), "device": "cpu", "max_length": 2048}
    agent = agent_app.build_app(
        {
            "model": model,
            "dataset_root": str(demo_root),
            "torch_threads": 1,
            "adapters": {"nova-lora": str(lora)},
            "generation": {"max_new_tokens": 8},
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
            "limits": {
                "max_body_bytes": 1_000_000,
                "max_image_bytes": 200_000,
                "max_new_tokens": 64,
                "max_image_side": 4096,
            },
            "deployment": {
                "num_replicas": 1,
                "max_ongoing_requests": 32,
                "max_queued_requests": 64,
                "num_cpus": 0.5,
                "graceful_shutdown_timeout_s": 30,
            },
        }
    )
    converse_out = tmp_path_factory.mktemp("converse_out")  # the judge page shows <converse_out>/converse
    (converse_out / "converse").mkdir()
    judge = judge_app.build_app(
        {
            "model": model,
            "dataset_root": str(demo_root),
            "converse_dir": str(converse_out / "converse"),
            "torch_threads": 1,
            "generation": {"max_new_tokens": 8, "min_new_tokens": 8},
            "max_retries": 0,
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
            "deployment": {
                "num_replicas": 1,
                "max_ongoing_requests": 8,
                "max_queued_requests": 4,
                "num_cpus": 0.5,
                "env": {"MMROLE_API_TOKEN": SERVE_TOKEN},
            },
        }
    )
    try:
        serve.run(agent, name="agent", route_prefix="/agent")
        serve.run(judge, name="judge", route_prefix="/judge")
        yield {
            "tiny": str(tiny),
            "base": f"http://127.0.0.1:{port}",
            "agent": f"http://127.0.0.1:{port}/agent",
            "judge": f"http://127.0.0.1:{port}/judge",
            "token": SERVE_TOKEN,
            "converse_out": converse_out,
        }
    finally:
        if ray_session.is_initialized():  # an exclusive_ray test may have ended the session's Ray already
            serve.shutdown()
