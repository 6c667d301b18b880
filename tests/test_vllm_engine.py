"""engine: vllm. In the main environment (no vLLM): the setting fails with the install advice, and the engine is part
of the cache keys only when it is vllm. The equivalence of the two engines runs for real in .venv-vllm (built once
by scripts/bootstrap_vllm.sh, cached), through Ray: tests/vllm_equivalence.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmrole.config import ConfigError
from mmrole.eval.cache_keys import agent_identity, digest, judge_identity
from mmrole.eval.job_config import GenerateJobConfig, JudgeSettings, load_job_config
from mmrole.models.engines import VLLMSettings, engine_identity, vllm_available

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_engine_vllm_without_vllm_names_the_script(tmp_path):
    with pytest.raises(ConfigError, match=r"agent.engine: vllm: .*scripts/bootstrap_vllm.sh"):
        load_job_config(
            GenerateJobConfig, None, ["model_name=m", f"agent.model_path={tmp_path}", "agent.engine=vllm", "data=."]
        )
    with pytest.raises(ConfigError, match=r"judge.engine: vllm: .*bootstrap_vllm"):
        JudgeSettings(kind="local", model={"model_path": str(tmp_path)}, engine="vllm")
    with pytest.raises(ConfigError, match="agent.engine: 'sglang' is not one of"):
        load_job_config(
            GenerateJobConfig, None, ["model_name=m", f"agent.model_path={tmp_path}", "agent.engine=sglang", "data=."]
        )


def test_engine_is_in_the_cache_key_only_when_vllm(tmp_path):
    from mmrole.models import GenerationParams

    gen = GenerationParams(max_new_tokens=8)
    base = {"kind": "local", "model_path": str(tmp_path), "openai": None}
    hf = agent_identity({**base, "engine": "hf", "vllm": VLLMSettings().to_dict()}, gen)
    assert hf == agent_identity(base, gen)  # stores written before the setting existed keep their keys
    vl = agent_identity({**base, "engine": "vllm", "vllm": VLLMSettings().to_dict()}, gen)
    assert digest(vl) != digest(hf) and vl["engine"] == "vllm"
    # settings that change replies change the key; memory knobs do not
    longer = agent_identity({**base, "engine": "vllm", "vllm": VLLMSettings(max_model_len=99).to_dict()}, gen)
    assert digest(longer) != digest(vl)
    roomier = agent_identity({**base, "engine": "vllm", "vllm": VLLMSettings(kv_cache_space_gb=8).to_dict()}, gen)
    assert digest(roomier) == digest(vl)
    assert engine_identity("hf", VLLMSettings()) == {}
    judge = JudgeSettings(kind="local", model={"model_path": str(tmp_path)})
    assert "engine" not in judge_identity(judge)


def _vllm_python() -> Path:
    """.venv-vllm's python, built by scripts/bootstrap_vllm.sh when missing or stale (minutes the first time)."""
    env = dict(os.environ)
    ray_version = subprocess.run(
        [sys.executable, "-c", "import ray; print(ray.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    env.setdefault("MMROLE_RAY_VERSION", ray_version)
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap_vllm.sh")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, f"scripts/bootstrap_vllm.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return REPO / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.skipif(os.environ.get("MMROLE_SKIP_VLLM") == "1", reason="MMROLE_SKIP_VLLM=1")
def test_vllm_answers_and_scores_like_hf_through_ray(tmp_path):
    """Greedy replies of engine: vllm and engine: hf on the demo test split (run_generate) and the judge requests
    (run_score), both through Ray in .venv-vllm: identical, or the same parsed scores for >= 95%."""
    py = _vllm_python()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "VIRTUAL_ENV"))}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    r = subprocess.run(
        [str(py), str(REPO / "tests" / "vllm_equivalence.py"), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    report_path = tmp_path / "equivalence.json"
    assert report_path.exists(), f"the vLLM run wrote no report:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    assert report["generate_vllm"]["answered"] == report["generate_hf"]["answered"] > 0, report
    assert report["ok"], json.dumps(report, indent=2)[:4000]
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("MMROLE_SKIP_VLLM") == "1", reason="MMROLE_SKIP_VLLM=1")
def test_serve_agent_on_vllm_answers_the_openai_client(tmp_path):
    """The agent app with engine: vllm (in .venv-vllm): the official openai client gets a reply, a stream of
    several chunks equal to it (greedy), and a LoRA adapter's reply (vLLM LoRA) that differs."""
    py = _vllm_python()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "VIRTUAL_ENV"))}
    r = subprocess.run(
        [str(py), str(REPO / "tests" / "vllm_serve_check.py"), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    path = tmp_path / "serve_check.json"
    assert path.exists(), f"the Serve check wrote no report:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    report = json.loads(path.read_text())
    assert report["ok"], json.dumps(report, indent=2)
