"""The one config system: path fields resolved on the driver, one error format for every job and Serve app,
``--print-config`` and ``mmrole config show``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

from mmrole.config import ConfigError, config_error_message, load_config_file, path_field, resolve_path, resolve_paths
from mmrole.config_cli import detect_kind, show
from mmrole.eval.job_config import GenerateJobConfig, ScoreJobConfig
from mmrole.serving import AgentAppConfig, JudgeAppConfig
from mmrole.train.config import TrainJobConfig

REPO = Path(__file__).resolve().parents[1]


def load_job_script(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_the_working_dir(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_path("demo_out/prepared", "input", "data", tmp_path, False) == str(tmp_path / "demo_out/prepared")
    assert resolve_path("runs", "output", "out", tmp_path, False) == str(tmp_path / "runs")
    assert resolve_path("/abs/x/../y", "input", "k", tmp_path, True) == "/abs/y"
    assert resolve_path("~/x", "output", "k", tmp_path, True) == str(Path.home() / "x")
    # model paths: hub ids and tiny specs stay; anything that is clearly (or exists as) a local path resolves
    assert resolve_path("Qwen/Qwen2.5-VL-7B-Instruct", "model", "m", tmp_path, False) == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert resolve_path("tiny:qwen2_vl", "model", "m", tmp_path, False) == "tiny:qwen2_vl"
    assert resolve_path("models/m", "model", "m", tmp_path, False) == str(tmp_path / "models/m")
    assert resolve_path("./m2", "model", "m", tmp_path, False) == str(tmp_path / "m2")
    assert resolve_path("runs/_models/tiny", "model", "m", tmp_path, False) == str(tmp_path / "runs/_models/tiny")


def test_submitted_job_refuses_relative_outputs_and_missing_inputs(tmp_path):
    (tmp_path / "shipped").mkdir()
    assert resolve_path("shipped", "input", "data", tmp_path, True) == str(tmp_path / "shipped")
    with pytest.raises(ConfigError, match=r"^out: 'runs' is relative; under `ray job submit`.*lost"):
        resolve_path("runs", "output", "out", tmp_path, True)
    with pytest.raises(ConfigError, match=r"^data: 'nope' is relative.*does not exist.*data=\$PWD/nope"):
        resolve_path("nope", "input", "data", tmp_path, True)


def test_resolve_paths_walks_nested_configs_and_lists_every_bad_key(tmp_path):
    cfg = load_config_file(TrainJobConfig, REPO / "configs" / "smoke_cpu.yaml")
    resolve_paths(cfg, base=tmp_path, submitted=False)
    assert cfg.output_dir == str(tmp_path / "runs")
    assert cfg.data.prepared == str(tmp_path / "demo_out/prepared")
    assert cfg.model.model_path == str(tmp_path / "runs/_models/tiny-qwen2_5_vl")
    cfg = load_config_file(TrainJobConfig, REPO / "configs" / "smoke_cpu.yaml")
    with pytest.raises(ConfigError) as ei:
        resolve_paths(cfg, base=tmp_path, submitted=True)
    for key in ("model.model_path", "data.prepared", "output_dir"):
        assert f"{key}: " in str(ei.value)


def test_path_field_literals_and_optional_values(tmp_path):
    @dataclass
    class C:
        root: Optional[str] = path_field("input", literals=("demo",), default=None)
        other: Optional[str] = path_field("input", default=None)

    assert resolve_paths(C(root="demo"), tmp_path, True).root == "demo"
    assert resolve_paths(C(other=None), tmp_path, True).other is None
    assert resolve_paths(C(other="x"), tmp_path, False).other == str(tmp_path / "x")


# ------------------------------------------------------------------------------------------------ errors

JOB_CONFIGS = {
    "train": (TrainJobConfig, "configs/smoke_cpu.yaml", "model.max_lenght=3", "train.lr=fast", "train.lr"),
    "generate": (
        GenerateJobConfig,
        "configs/eval/generate_tiny_cpu.yaml",
        "pool.batchsize=3",
        "pool.batch_size=many",
        "pool.batch_size",
    ),
    "score": (ScoreJobConfig, "configs/eval/score_local.yaml", "judge.model.dtyp=x", "bootstrap=lots", "bootstrap"),
}


@pytest.mark.parametrize("kind", sorted(JOB_CONFIGS))
def test_job_configs_name_the_dotted_key(kind):
    cls, path, unknown, wrong, wrong_key = JOB_CONFIGS[kind]
    with pytest.raises(ConfigError) as ei:
        load_config_file(cls, REPO / path, [unknown])
    assert config_error_message(ei.value).startswith(f"config error: {unknown.split('=')[0]}: unknown key")
    with pytest.raises(ConfigError) as ei:
        load_config_file(cls, REPO / path, [wrong])
    assert config_error_message(ei.value).startswith(f"config error: {wrong_key}: expected")


@pytest.mark.parametrize("cls", [AgentAppConfig, JudgeAppConfig])
def test_serve_app_configs_name_the_dotted_key(cls):
    base = {"model": {"model_path": "tiny:qwen2_5_vl"}}
    for bad, needle in [
        ({"batching": {"max_batch_sise": 4}}, "batching.max_batch_sise: unknown key"),
        ({"batching": {"max_batch_size": "big"}}, "batching.max_batch_size: expected an integer"),
        ({"model": {"model_path": "tiny:qwen2_5_vl", "max_lenght": 4}}, "model.max_lenght: unknown key"),
        ({"model": {"model_path": "tiny:qwen2_5_vl", "max_length": "long"}}, "model.max_length: expected an integer"),
        ({"modle": {}}, "modle: unknown key"),
    ]:
        with pytest.raises(ConfigError) as ei:
            cls.from_dict({**base, **bad})
        assert str(ei.value).startswith(needle), str(ei.value)


@pytest.mark.parametrize(
    "job, path",
    [
        ("train_agent", "configs/smoke_cpu.yaml"),
        ("generate_answers", "configs/eval/generate_tiny_cpu.yaml"),
        ("score_answers", "configs/eval/score_local.yaml"),
    ],
)
def test_jobs_print_config_and_exit_2_on_config_errors(job, path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    main = load_job_script(job).main
    assert main(["--config", path, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    paths = [v for v in _leaves(printed) if isinstance(v, str) and ("/" in v)]
    assert paths and all(p.startswith("/") or p.startswith("tiny:") for p in paths), paths
    assert main(["--config", path, "no_such_key=1"]) == 2
    assert capsys.readouterr().err.startswith("config error: no_such_key: unknown key")


def _leaves(d):
    if isinstance(d, dict):
        for v in d.values():
            yield from _leaves(v)
    else:
        yield d


def test_train_job_refuses_relative_paths_under_job_submit(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    main = load_job_script("train_agent").main
    assert main(["--config", "configs/smoke_cpu.yaml", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and "output_dir: 'runs' is relative" in err


# ------------------------------------------------------------------------------------------------ config show


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(REPO)) for d in ("configs", "serve") for p in (REPO / d).rglob("*.yaml"))
)
def test_every_shipped_config_validates(path, monkeypatch):
    """Each YAML the project ships builds as its job (or Serve app) would build it: a key renamed in code and
    left in a config fails here, not at a user's first run."""
    monkeypatch.chdir(REPO)
    assert yaml.safe_load(show(path, [])), path


def test_config_show_detects_each_kind_and_applies_overrides(monkeypatch):
    monkeypatch.chdir(REPO)
    kinds = {
        "configs/smoke_cpu.yaml": "train",
        "configs/smoke_cpu_rm.yaml": "train",
        "configs/eval/generate_tiny_cpu.yaml": "generate",
        "configs/eval/score_local.yaml": "score",
        "serve/agent_cpu.yaml": "serve",
        "serve/judge_cpu.yaml": "serve",
        "configs/dpo_smoke_cpu.yaml": "dpo",
        "configs/grpo_demo_cpu.yaml": "grpo",
        "configs/preferences_smoke_cpu.yaml": "preferences",
        "configs/datagen/vllm.yaml": "datagen",
    }
    for path, kind in kinds.items():
        assert detect_kind(yaml.safe_load((REPO / path).read_text())) == kind, path
    shown = yaml.safe_load(show("configs/smoke_cpu.yaml", ["train.lr=0.5", "output_dir=/tmp/r"]))
    assert shown["train"]["lr"] == 0.5 and shown["output_dir"] == "/tmp/r"
    assert shown["data"]["prepared"] == str(REPO / "demo_out/prepared")
    served = yaml.safe_load(show("serve/agent_cpu.yaml", ["agent.batching.max_batch_size=4"]))
    assert served["agent"]["batching"]["max_batch_size"] == 4
    with pytest.raises(ConfigError, match=r"^batching\.max_batch_size: expected an integer"):
        show("serve/judge_cpu.yaml", ["judge.batching.max_batch_size=x"])
