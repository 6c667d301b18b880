"""Resumable results store and the single-process scoring loop: a crashed run plus a rerun scores every
(sample_id, metric) exactly once."""

from __future__ import annotations

import json

import pytest

from mmrole.eval.contract import JudgeResult, expand_requests, result_from_reply
from mmrole.eval.formats import AnswerRecord, load_reviews_file, read_results_csv
from mmrole.eval.pipeline import score_requests, write_model_outputs
from mmrole.eval.report import build_report
from mmrole.eval.store import ResultsStore, StoreError, load_results, store_for


class Crash(Exception):
    pass


class ScriptedJudge:
    """Replies from a function of the request; counts how often each key was asked; can crash after N batches."""

    name = "scripted"

    def __init__(self, reply=None, crash_after_batches=None):
        self.reply = reply or (lambda r: f"fine [Scores]: ({len(r.sample_id) % 10 + 1}, 8)")
        self.crash_after = crash_after_batches
        self.asked: dict = {}
        self.batches = 0

    def score_batch(self, requests):
        if self.crash_after is not None and self.batches >= self.crash_after:
            raise Crash("killed mid-run")
        self.batches += 1
        out = []
        for r in requests:
            self.asked[r.key] = self.asked.get(r.key, 0) + 1
            out.append(result_from_reply(r, self.reply(r), judge=self.name))
        return out


def _answers(n=5, set_name="in-test", dtype="comment"):
    return [
        AnswerRecord(
            id=f"{dtype}_{set_name}_{i}",
            question=f"q{i}",
            reference=f"t{i}",
            answer=f"a{i}",
            image=f"{i}.jpg",
            role="Iron Man",
            set_name=set_name,
            dialogue_type=dtype,
        )
        for i in range(n)
    ]


def test_half_written_run_then_rerun_gives_every_key_exactly_once(tmp_path):
    answers = _answers(5) + _answers(3, "out-test", "inter-role")
    reqs = expand_requests(answers)  # 64 requests
    store = ResultsStore(tmp_path / "r.jsonl")
    crashing = ScriptedJudge(crash_after_batches=3)
    with pytest.raises(Crash):
        score_requests(reqs, crashing, store, batch_size=10)
    # the process also died while appending: a half-written line at the end
    with open(store.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(JudgeResult(reqs[30].sample_id, reqs[30].metric, True, 5.0, 5.0).to_dict())[:40])
    audit = store.audit(r.key for r in reqs)
    assert audit.truncated_tail and audit.n_lines == 30 and len(audit.missing) == 34 and not audit.complete

    rerun = ScriptedJudge()
    summary = score_requests(reqs, rerun, store, batch_size=10)
    assert summary.n_already_done == 30 and summary.n_scored == 34 and summary.n_failed == 0
    assert set(rerun.asked) == {r.key for r in reqs[30:]}  # only what was missing was asked
    assert all(crashing.asked.get(k, 0) + rerun.asked.get(k, 0) == 1 for k in (r.key for r in reqs))
    audit = store.audit(r.key for r in reqs)
    assert audit.complete and not audit.truncated_tail
    assert audit.n_lines == audit.n_keys == 64 and audit.repeated == {}
    # every line is valid JSON again (the partial line was cut, not glued to the next record)
    assert all(json.loads(line) for line in store.path.read_text().splitlines())
    # a third run has nothing to do
    third = ScriptedJudge()
    assert score_requests(reqs, third, store).n_scored == 0 and third.asked == {}


def test_failures_are_kept_and_can_be_retried(tmp_path):
    reqs = expand_requests(_answers(2))
    store = ResultsStore(tmp_path / "r.jsonl")
    flaky = ScriptedJudge(reply=lambda r: "no idea" if r.metric == "Fluency" else "ok [Scores]: (6, 8)")
    s = score_requests(reqs, flaky, store, batch_size=4)
    assert (s.n_ok, s.n_failed) == (14, 2) and s.failures == {"no score pair found": 2}
    res = store.load()
    assert not res[(reqs[1].sample_id, "Fluency")].ok
    assert res[(reqs[1].sample_id, "Fluency")].review == "no idea"
    # without retry_failed, a recorded failure counts as done
    assert store.pending(reqs) == []
    again = ScriptedJudge()
    s2 = score_requests(reqs, again, store, retry_failed=True)
    assert s2.n_scored == 2 and set(k[1] for k in again.asked) == {"Fluency"}
    audit = store.audit(r.key for r in reqs)
    assert audit.complete and audit.n_failed == 0 and len(audit.repeated) == 2 and audit.n_lines == 18
    # a later failure never hides an earlier score
    k = reqs[0].key
    store.append([JudgeResult(k[0], k[1], False, error="late failure")])
    assert store.load()[k].ok


def test_corrupt_store_lines_are_errors_naming_the_line(tmp_path):
    p = tmp_path / "r.jsonl"
    good = json.dumps(JudgeResult("s", "Fluency", True, 1.0, 2.0).to_dict())
    p.write_text(good + "\n{not json}\n" + good + "\n")
    with pytest.raises(StoreError, match=r"r.jsonl:2: corrupt"):
        ResultsStore(p).load()
    p.write_text(good + "\n" + json.dumps(JudgeResult("s", "Coherency", True, 1.0, 2.0, swapped=True).to_dict()) + "\n")
    with pytest.raises(StoreError, match="mixes swapped"):
        ResultsStore(p).load()


def test_load_results_merges_worker_files(tmp_path):
    a, b = ResultsStore(tmp_path / "w0.jsonl"), ResultsStore(tmp_path / "w1.jsonl")
    a.append([JudgeResult("s1", "Fluency", True, 1.0, 2.0)])
    b.append([JudgeResult("s1", "Fluency", False, error="x"), JudgeResult("s2", "Fluency", True, 3.0, 3.0)])
    merged = load_results([a.path, b.path])
    assert set(merged) == {("s1", "Fluency"), ("s2", "Fluency")} and merged[("s1", "Fluency")].ok
    assert store_for(tmp_path, "m", swapped=True).path.name == "m.swapped.jsonl"


def test_judge_must_answer_each_request_once(tmp_path):
    class Dropping(ScriptedJudge):
        def score_batch(self, requests):
            return super().score_batch(requests)[:-1]

    with pytest.raises(RuntimeError, match="one to one"):
        score_requests(expand_requests(_answers(1)), Dropping(), ResultsStore(tmp_path / "r.jsonl"))


def test_write_model_outputs_then_report(tmp_path):
    answers = _answers(4) + _answers(2, "out-test", "human-role")
    reqs = expand_requests(answers)
    store = ResultsStore(tmp_path / "r.jsonl")
    judge = ScriptedJudge(
        reply=lambda r: (
            "bad reply"
            if (r.sample_id.endswith("_0") and r.metric == "Coherency")
            else f"[Scores]: ({int(r.sample_id[-1]) + 5}, 8)"
        )
    )
    score_requests(reqs, judge, store)
    paths = write_model_outputs(tmp_path / "eval", "mine", answers, store.load())
    assert sorted(p.relative_to(tmp_path / "eval").as_posix() for p in paths) == [
        "in-test_results/mine/comment_test.csv",
        "in-test_reviews/mine/comment_test.json",
        "out-test_results/mine/human-role_test.csv",
        "out-test_reviews/mine/human-role_test.json",
    ]
    count, means = read_results_csv(tmp_path / "eval/in-test_results/mine/comment_test.csv")
    assert count == 4
    assert means["Fluency"] == pytest.approx((5 + 6 + 7 + 8) / 4 / 8)
    assert means["Coherency"] == pytest.approx((6 + 7 + 8) / 3 / 8)  # the failure is excluded, not a zero
    recs, _ = load_reviews_file(tmp_path / "eval/in-test_reviews/mine/comment_test.json")
    assert recs[0].reviews["Coherency"].score is None
    rep = build_report(tmp_path / "eval", bootstrap=0)
    (g,) = rep.overall
    assert g.n_samples == 6 and g.n_failed == 2 and g.metrics["Coherency"].n == 4
    with pytest.raises(Exception, match="missing"):
        write_model_outputs(tmp_path / "eval2", "mine", answers + _answers(1, "in-test", "inter-role"), store.load())
