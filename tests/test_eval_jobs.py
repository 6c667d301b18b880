"""The Ray evaluation jobs: batch answering and scoring, resume, exactly-once, and elastic clusters."""

from __future__ import annotations

import json
import threading

import pytest
from fake_chat_server import FakeChatServer, text_hash

from mmrole.eval.job_config import GenerateJobConfig, ScoreJobConfig, load_job_config
from mmrole.eval.metrics import METRICS
from mmrole.eval.store import ResultsStore

POOL = ["pool.concurrency=[2]", "pool.num_cpus=0.5", "pool.batch_size=4"]


def _generate_cfg(tiny_models, demo_prepared, out, *extra):
    return load_job_config(
        GenerateJobConfig,
        None,
        [
            "model_name=tiny-agent",
            f"agent.model_path={tiny_models['agent']}",
            f"data={demo_prepared}",
            f"out={out}",
            "generation.max_new_tokens=6",
            "generation.min_new_tokens=2",
            *POOL,
            *extra,
        ],
    )


@pytest.mark.ray
def test_answer_then_score_resumes_exactly_once(ray_local, tiny_models, demo_prepared, demo_root, tmp_path):
    from mmrole.data.prepared import iter_samples
    from mmrole.ray_eval import run_generate, run_score

    out = tmp_path / "eval"
    test_ids = {s.id for s in iter_samples(demo_prepared, "test")}
    first = run_generate(_generate_cfg(tiny_models, demo_prepared, out), stop_after=4)
    assert first["stopped"] and 4 <= first["answered"] < len(test_ids)
    summary = run_generate(_generate_cfg(tiny_models, demo_prepared, out))
    assert summary["samples"] == len(test_ids)
    assert summary["answered_now"] == len(test_ids) - first["answered"]  # resumed, nothing answered twice
    store_lines = (out / "answer_store" / "tiny-agent.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in store_lines) == sorted(test_ids)
    written = {}
    for f in out.glob("*-test_answers/tiny-agent/*_test.json"):
        for rec in json.loads(f.read_text()):
            written[rec["id"]] = rec
    assert set(written) == test_ids and len(list(out.glob("*-test_answers/tiny-agent/*.json"))) == 6
    assert all("answer" in r["conversations"][1] for r in written.values())

    score = load_job_config(
        ScoreJobConfig,
        None,
        [
            f"eval_dir={out}",
            "model_name=tiny-agent",
            f"images_root={demo_root / 'images'}",
            f"judge.model.model_path={tiny_models['judge']}",
            "judge.generation.max_new_tokens=8",
            "judge.max_retries=1",
            *POOL,
            "pool.batch_size=8",
        ],
    )
    n = len(test_ids) * len(METRICS)
    part = run_score(score, stop_after=16)
    assert part["stopped"] and part["scored"] < n
    done = run_score(score)
    assert done["requests"] == n and done["scored_now"] == n - part["scored"]
    audit = ResultsStore(out / "judge_results" / "tiny-agent.jsonl").audit({(i, m) for i in test_ids for m in METRICS})
    assert audit.complete and audit.n_lines == audit.n_keys == n  # every (id, metric) exactly once
    # A random-weight judge writes no score pair: recorded as failures with raw text, never as zeros.
    results = ResultsStore(out / "judge_results" / "tiny-agent.jsonl").load()
    assert done["failed"] == sum(not r.ok for r in results.values())
    assert all(r.score_a is None and r.error for r in results.values() if not r.ok)
    assert len(list(out.glob("*-test_reviews/tiny-agent/*_test.json"))) == 6
    assert len(list(out.glob("*-test_results/tiny-agent/*_test.csv"))) == 6


class HashJudgeServer(FakeChatServer):
    """An OpenAI-compatible fake on 127.0.0.1 whose scores are a hash of the prompt: deterministic, so two runs
    of the same requests must give the same report however the work was spread over nodes."""

    def __init__(self, delay_s: float = 0.0):
        def reply(body: dict) -> str:
            h = text_hash(json.dumps(body["messages"], sort_keys=True))
            threading.Event().wait(delay_s)
            return f"Compared. [Scores]: ({1 + h % 10}, {1 + (h // 10) % 10})"

        super().__init__(reply)


def _published_answers(sample_dir, out, model="gpt-4-turbo"):
    """The published answers of one model, laid out as our answers folder (no images needed: API judge)."""
    import shutil

    for s in ("in", "out"):
        src = sample_dir / "eval" / f"{s}-test_answers" / model
        shutil.copytree(src, out / f"{s}-test_answers" / model)


def _api_score_cfg(out, images, url, model="gpt-4-turbo", *extra):
    return load_job_config(
        ScoreJobConfig,
        None,
        [
            f"eval_dir={out}",
            f"model_name={model}",
            f"images_root={images}",
            "judge.kind=openai",
            "judge.openai.model=fake",
            f"judge.openai.base_url={url}",
            "judge.openai.api_key_env=null",
            "judge.openai.require_api_key=false",
            "judge.openai.max_concurrency=4",
            "judge.openai.timeout_s=20",
            "pool.concurrency=[2]",
            "pool.num_cpus=1",
            "pool.batch_size=16",
            "bootstrap=0",
            *extra,
        ],
    )


@pytest.fixture()
def stand_in_images(sample_dir, tmp_path):
    """Pillow stand-ins at the image paths the published test split references."""
    from PIL import Image

    from mmrole.eval.pipeline import load_answers_dir

    root = tmp_path / "images"
    out = tmp_path / "answers"
    _published_answers(sample_dir, out)
    answers, _ = load_answers_dir(out, "gpt-4-turbo")
    for a in answers:
        p = root / a.image
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 16), (len(a.image) * 7 % 255, 90, 160)).save(p, format="PNG")
    return root


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.exclusive_ray  # its own multi-node cluster: runs last (tests/conftest.py)
def test_elastic_scoring_survives_node_loss(sample_dir, stand_in_images, tmp_path):
    """Remove a worker node mid-run and add another: every (sample, metric) is scored exactly once and the
    report equals an undisturbed run's."""
    import ray
    from ray.cluster_utils import Cluster

    from mmrole.eval.report import build_report, render_markdown
    from mmrole.ray_env import project_env_vars
    from mmrole.ray_eval import run_score

    if ray.is_initialized():
        ray.shutdown()
    server = HashJudgeServer(delay_s=0.02)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    ray.init(address=cluster.address, runtime_env={"env_vars": project_env_vars()}, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        calm, churn = tmp_path / "calm", tmp_path / "churn"
        _published_answers(sample_dir, calm)
        _published_answers(sample_dir, churn)
        run_score(_api_score_cfg(calm, stand_in_images, server.url))
        events = []

        def churn_nodes(n_done: int) -> None:
            if not events and n_done >= 200:
                cluster.remove_node(workers[0])
                events.append(cluster.add_node(num_cpus=2))

        summary = run_score(_api_score_cfg(churn, stand_in_images, server.url), on_batch=churn_nodes)
        assert events, "the node was never removed (run finished too fast)"
        n = 294 * len(METRICS)
        assert summary["requests"] == n
        keys = {
            (json.loads(x)["sample_id"], json.loads(x)["metric"])
            for x in (churn / "judge_results" / "gpt-4-turbo.jsonl").read_text().splitlines()
        }
        audit = ResultsStore(churn / "judge_results" / "gpt-4-turbo.jsonl").audit(keys)
        assert audit.complete and audit.n_lines == audit.n_keys == n
        a, b = build_report(calm, bootstrap=0), build_report(churn, bootstrap=0)
        assert render_markdown(a) == render_markdown(b) and "n/a" not in render_markdown(a)
        for f in calm.glob("*-test_results/gpt-4-turbo/*.csv"):
            assert f.read_bytes() == (churn / f.relative_to(calm)).read_bytes()
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.close()


@pytest.mark.parametrize("name", ["generate.yaml", "generate_tiny_cpu.yaml"])
def test_generate_configs_load(name):
    from pathlib import Path

    cfg = load_job_config(GenerateJobConfig, Path(__file__).parents[1] / "configs" / "eval" / name)
    assert cfg.pool.concurrency_arg() and cfg.agent.model_path


@pytest.mark.parametrize(
    "name,kind",
    [
        ("score_local.yaml", "local"),
        ("score_openai.yaml", "openai"),
        ("score_serve.yaml", "serve"),
        ("score_cpu.yaml", "local"),
    ],
)
def test_score_configs_load(name, kind):
    from pathlib import Path

    cfg = load_job_config(ScoreJobConfig, Path(__file__).parents[1] / "configs" / "eval" / name)
    assert cfg.judge.kind == kind


def test_bad_job_config_names_the_key():
    from mmrole.train.config import ConfigError

    with pytest.raises(ConfigError, match="pool.batchsize"):
        load_job_config(GenerateJobConfig, None, ["model_name=x", "agent.model_path=m", "data=d", "pool.batchsize=3"])
    with pytest.raises(ConfigError, match="judge.model"):
        load_job_config(ScoreJobConfig, None, ["eval_dir=e", "model_name=x", "images_root=i", "judge.kind=local"])
