"""Caches keyed by what produced them: a judgement is reused only for the same judge, template, generation
parameters and answer text; an answer only for the same agent, generation parameters and rendered sample."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mmrole.eval.cache_keys import agent_identity, answer_key, digest, judgement_keys, openai_judge_identity
from mmrole.eval.contract import expand_requests, result_from_reply
from mmrole.eval.formats import AnswerRecord
from mmrole.eval.openai_judge import OpenAIJudgeConfig
from mmrole.eval.pipeline import score_requests
from mmrole.eval.store import ResultsStore
from mmrole.eval.template import JudgeTemplate
from mmrole.eval.template_loader import load_judge_template
from mmrole.models import GenerationParams


class CountingJudge:
    name = "counting"

    def __init__(self, reply=lambda r: "ok [Scores]: (7, 8)"):
        self.reply = reply
        self.asked = 0

    def score_batch(self, requests):
        self.asked += len(requests)
        return [result_from_reply(r, self.reply(r), judge=self.name) for r in requests]


def _answers(n=3, answer="a"):
    return [
        AnswerRecord(
            id=f"s{i}", question=f"q{i}", reference=f"t{i}", answer=f"{answer}{i}", image=f"{i}.jpg", role="Iron Man"
        )
        for i in range(n)
    ]


def _keys(requests, template=None, **judge):
    cfg = OpenAIJudgeConfig(model=judge.pop("model", "judge-1"), **judge)
    return judgement_keys(requests, openai_judge_identity(cfg), template or load_judge_template())


def _score(tmp_path, requests, keys, judge=None, retry_failed=False):
    store = ResultsStore(tmp_path / "r.jsonl", keys)
    judge = judge or CountingJudge()
    summary = score_requests(requests, judge, store, batch_size=8, retry_failed=retry_failed)
    return summary, store, judge


def test_judgements_are_reused_only_for_the_same_judge_template_params_and_answer(tmp_path):
    reqs = expand_requests(_answers())
    n = len(reqs)
    s, store, _ = _score(tmp_path, reqs, _keys(reqs))
    assert s.n_scored == n and all(r.cache_key for r in store.load().values())
    s, _, judge = _score(tmp_path, reqs, _keys(reqs))  # nothing changed: nothing asked
    assert s.n_scored == 0 and judge.asked == 0
    # A different judge model, generation parameter, template or answer text: recomputed.
    assert _score(tmp_path, reqs, _keys(reqs, model="judge-2"))[0].n_scored == n
    assert _score(tmp_path, reqs, _keys(reqs, temperature=0.3))[0].n_scored == n
    other = JudgeTemplate.from_dict({**load_judge_template().to_dict(), "system": "Another judge persona."})
    assert _score(tmp_path, reqs, _keys(reqs, template=other))[0].n_scored == n
    changed = expand_requests(_answers(answer="b"))
    s, store, _ = _score(tmp_path, changed, _keys(changed))
    assert s.n_scored == n and store.check.n_stale == 4 * n  # the 4 earlier generations: not reused
    assert store.warning() and "different model, template" in store.warning()
    # Back to the first judge: its results are still there and reused.
    assert _score(tmp_path, reqs, _keys(reqs))[0].n_scored == 0


def test_retry_failed_redoes_only_failures(tmp_path):
    reqs = expand_requests(_answers(2))
    flaky = CountingJudge(lambda r: "no score here" if r.sample_id == "s0" else "ok [Scores]: (6, 8)")
    s, store, _ = _score(tmp_path, reqs, _keys(reqs), judge=flaky)
    assert s.n_failed == 8 and s.n_ok == 8
    s, _, judge = _score(tmp_path, reqs, _keys(reqs))  # failures are results: a plain rerun does nothing
    assert s.n_scored == 0
    s, store, judge = _score(tmp_path, reqs, _keys(reqs), retry_failed=True)
    assert judge.asked == 8 and s.n_ok == 8
    assert all(r.ok for r in store.load().values())


def test_old_store_without_keys_is_read_with_a_warning_not_mixed(tmp_path):
    reqs = expand_requests(_answers(2))
    legacy = ResultsStore(tmp_path / "r.jsonl")  # no cache keys: as written by an older mmrole
    legacy.append(result_from_reply(r, "ok [Scores]: (5, 8)", judge="old") for r in reqs)
    assert not any(json.loads(x).get("cache_key") for x in (tmp_path / "r.jsonl").read_text().splitlines())
    s, store, judge = _score(tmp_path, reqs, _keys(reqs))
    assert judge.asked == len(reqs)  # recomputed, never mixed with the new judge's scores
    assert store.check.n_unkeyed == len(reqs) and "no cache key" in store.warning()
    assert {r.score_a for r in store.load().values()} == {7.0}
    # Read without keys (e.g. for inspection), the file still holds both generations.
    assert len(ResultsStore(tmp_path / "r.jsonl").read_lines()[0]) == 2 * len(reqs)


def test_answer_keys_follow_agent_params_and_rendered_sample(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x" * 10)
    agent = {"kind": "local", "model_path": str(ckpt), "device": "cpu", "max_length": 4096}
    g = GenerationParams(max_new_tokens=32)
    base = digest(agent_identity(agent, g))
    assert digest(agent_identity({**agent, "device": "cuda"}, g)) == base  # where it runs does not matter
    assert digest(agent_identity(agent, replace(g, max_new_tokens=64))) != base
    assert digest(agent_identity({**agent, "max_length": 2048}, g)) != base
    (ckpt / "model.safetensors").write_bytes(b"y" * 11)  # retrained in place
    assert digest(agent_identity(agent, g)) != base
    remote = {"kind": "openai", "base_url": "http://h/v1", "model": "m"}
    assert digest(agent_identity(remote, g)) != digest(agent_identity({**remote, "model": "m2"}, g))
    k = answer_key(base, "sys", "question", "1.jpg")
    assert k != answer_key(base, "sys", "question reworded", "1.jpg")  # another role-play template
    assert k == answer_key(base, "sys", "question", "1.jpg")


def test_fully_scored_models_finish_without_starting_ray(sample_dir, tmp_path, monkeypatch):
    """A rerun with nothing to do writes the outputs and says so without starting Ray (no cluster, no workers)."""
    import shutil
    import time

    from mmrole.eval.job_config import ScoreJobConfig, load_job_config
    from mmrole.ray_eval import plan_scoring, run_score

    eval_dir = tmp_path / "eval"
    for model in ("gpt-4-turbo", "qwen-vl-chat"):
        for s in ("in", "out"):
            shutil.copytree(sample_dir / "eval" / f"{s}-test_answers" / model, eval_dir / f"{s}-test_answers" / model)
    cfg = load_job_config(
        ScoreJobConfig,
        None,
        [
            f"eval_dir={eval_dir}",
            "models=[gpt-4-turbo, qwen-vl-chat]",
            f"images_root={tmp_path}",
            "judge.kind=openai",
            "judge.openai.model=some-judge",
            "judge.openai.base_url=http://127.0.0.1:9/v1",
            "progress=false",
        ],
    )
    plans = plan_scoring(cfg, log=lambda m: None)
    for p in plans.values():  # as if a previous run had scored everything with this judge
        p["store"].append(result_from_reply(r, "ok [Scores]: (7, 8)", judge="some-judge") for r in p["todo"])

    def no_ray():
        raise AssertionError("Ray must not start when there is nothing to score")

    logs = []
    t0 = time.perf_counter()
    summary = run_score(cfg, log=logs.append, start_ray=no_ray)
    elapsed = time.perf_counter() - t0
    assert set(summary["models"]) == {"gpt-4-turbo", "qwen-vl-chat"}
    assert all(s["scored_now"] == 0 and s["parsed"] == 294 * 8 for s in summary["models"].values())
    assert any("0 to do" in m for m in logs)
    assert len(list(eval_dir.glob("*-test_reviews/*/*_test.json"))) == 12
    assert elapsed < 30  # measured ~2 s idle; generous under a loaded CI box (targets live in bench/)
    # Another judge model: everything is to do again (and would start Ray).
    other = load_job_config(
        ScoreJobConfig,
        None,
        [f"{k}={v}" for k, v in (("eval_dir", eval_dir),)]
        + [
            "models=[gpt-4-turbo]",
            f"images_root={tmp_path}",
            "judge.kind=openai",
            "judge.openai.model=judge-2",
            "judge.openai.base_url=http://127.0.0.1:9/v1",
        ],
    )
    assert len(plan_scoring(other, log=lambda m: None)["gpt-4-turbo"]["todo"]) == 294 * 8
    # ... and a missing API key is reported on the driver, naming the variable, before any Ray work.
    from mmrole.eval.judges import JudgeConfigError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):
        run_score(other, log=lambda m: None, start_ray=no_ray)
