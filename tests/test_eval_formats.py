"""Published-format readers/writers: clear errors, counted rejects, round trips, the judge request contract."""

from __future__ import annotations

import json
import os

import pytest
from sample_data import sample_eval_dir as _sample_eval_dir

from mmrole.data.records import Sample
from mmrole.eval.contract import JudgeResult, build_judge_sample, expand_requests, result_from_reply, rm_training_sample
from mmrole.eval.formats import (
    EvalDataError,
    answer_record_dict,
    load_answers_file,
    load_reviews_file,
    read_results_csv,
    write_answers_file,
    write_results_csv,
    write_reviews_file,
)
from mmrole.eval.metrics import METRICS
from mmrole.eval.template import JudgeTemplateError
from mmrole.eval.template_loader import load_judge_template


def _rec(i, answer="my answer", **kw):
    r = {
        "id": f"R_comment_COCO_{i}",
        "system": "sys",
        "image": f"COCO/{i}.jpg",
        "conversations": [
            {"from": "user", "value": f"question {i}"},
            {"from": "assistant", "value": f"truth {i}", "answer": answer},
        ],
        "role": "Iron Man",
        "script": "The Avengers",
        "other_role": "a curious human",
    }
    r.update(kw)
    return r


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_malformed_json_names_the_file(tmp_path):
    p = tmp_path / "comment_test.json"
    p.write_text('[{"id": "x",', encoding="utf-8")
    with pytest.raises(EvalDataError, match="comment_test.json.*malformed JSON"):
        load_answers_file(p)
    _write(p, {"id": "x"})
    with pytest.raises(EvalDataError, match="expected a JSON list"):
        load_answers_file(p)
    with pytest.raises(EvalDataError, match="cannot read"):
        load_answers_file(tmp_path / "missing.json")


def test_bad_records_are_rejected_with_reasons_or_raise_in_strict_mode(tmp_path):
    bad_conv = _rec(2)
    bad_conv["conversations"] = [bad_conv["conversations"][0]]
    no_answer = _rec(3)
    del no_answer["conversations"][1]["answer"]
    no_role = _rec(4)
    del no_role["role"]
    data = [_rec(1), bad_conv, no_answer, no_role, _rec(1), "junk", _rec(5)]
    p = _write(tmp_path / "comment_test.json", data)
    recs, st = load_answers_file(p, set_name="in-test", dialogue_type="comment")
    assert [r.id for r in recs] == ["R_comment_COCO_1", "R_comment_COCO_5"]
    assert (st.n_in, st.n_out) == (7, 2)
    reasons = dict(st.rejected)
    assert "conversations" in reasons["R_comment_COCO_2"]
    assert "answer" in reasons["R_comment_COCO_3"]
    assert "'role'" in reasons["R_comment_COCO_4"]
    assert "#5" in reasons and "duplicate id" in [r for i, r in st.rejected if i == "R_comment_COCO_1"]
    assert len(st.rejected) == 5 and "5 rejected" in st.summary()
    with pytest.raises(EvalDataError, match=r"comment_test.json: record R_comment_COCO_2: .*conversations"):
        load_answers_file(p, strict=True)


def test_reviews_failures_are_entries_not_rejects(tmp_path):
    good = {m: {"review": "ok [Scores]: (8, 8)", "score": [8.0, 8.0]} for m in METRICS}
    r1 = _rec(1, rm_review=dict(good))
    r2 = _rec(
        2,
        rm_review={
            **good,
            "Fluency": {"review": "garbled", "score": None, "error": "unparsable"},
            "Coherency": {"review": "x", "score": [7, 0]},
        },
    )
    r3 = _rec(3, rm_review={k: v for k, v in good.items() if k != "Tone Consistency"} | {"Extra": {}})
    r4 = _rec(4)  # no rm_review at all
    p = _write(tmp_path / "comment_test.json", [r1, r2, r3, r4])
    recs, st = load_reviews_file(p)
    assert [r.id for r in recs] == ["R_comment_COCO_1", "R_comment_COCO_2", "R_comment_COCO_3"]
    assert st.rejected == [("R_comment_COCO_4", "missing or malformed 'rm_review'")]
    assert recs[1].reviews["Fluency"].score is None and recs[1].reviews["Fluency"].error == "unparsable"
    assert "B is 0" in recs[1].reviews["Coherency"].error
    assert "absent" in recs[2].reviews["Tone Consistency"].error
    assert any("Extra" in w for w in st.warnings)
    assert recs[0].reviews["Fluency"].ratio == 1.0


def test_answers_and_reviews_round_trip(tmp_path):
    s = Sample(
        id="X_human-role-dialogue_COCO_1_2",
        system="sys",
        user_text="the whole question",
        image="a.jpg",
        target="ground truth",
        role="Hermione Granger",
        other_role="a curious human",
        script="Harry Potter",
        dialogue_type="human-role",
        k=2,
    )
    p = tmp_path / "in-test_answers" / "m" / "human-role_test.json"
    write_answers_file(p, [answer_record_dict(s, "model says hi")])
    text = p.read_text(encoding="utf-8")
    assert text.startswith('[\n    {\n        "id"')  # indent 4 like the published files
    (a,), st = load_answers_file(p, set_name="in-test", dialogue_type="human-role")
    assert (a.question, a.reference, a.answer, a.role) == (
        "the whole question",
        "ground truth",
        "model says hi",
        "Hermione Granger",
    )
    results = {}
    for i, m in enumerate(METRICS):
        if m == "Fluency":
            results[(a.id, m)] = JudgeResult(
                a.id, m, False, review="??", error="unparsable after 3 replies", attempts=3
            )
        else:
            results[(a.id, m)] = JudgeResult(a.id, m, True, float(i + 1), 8.0, review=f"r [Scores]: ({i + 1}, 8)")
    rp = tmp_path / "in-test_reviews" / "m" / "human-role_test.json"
    write_reviews_file(rp, [a], results)
    raw = json.loads(rp.read_text(encoding="utf-8"))[0]
    assert list(raw["rm_review"]) == list(METRICS)
    assert raw["conversations"][1]["answer"] == "model says hi"
    assert raw["rm_review"]["Fluency"] == {
        "review": "??",
        "score": None,
        "error": "unparsable after 3 replies",
        "attempts": 3,
    }
    (rr,), _ = load_reviews_file(rp)
    assert rr.reviews["Fluency"].score is None
    assert rr.reviews["Coherency"].score == (3.0, 8.0)
    del results[(a.id, "Coherency")]
    with pytest.raises(EvalDataError, match="1 \\(id, metric\\) result\\(s\\) missing"):
        write_reviews_file(rp, [a], results)


def test_results_csv_round_trip_and_errors(tmp_path):
    p = tmp_path / "x.csv"
    means = {m: 1 / (i + 3) for i, m in enumerate(METRICS)}
    means["Fluency"] = None
    write_results_csv(p, 7, means)
    assert p.read_bytes().count(b"\r\n") == 2
    count, back = read_results_csv(p)
    assert count == 7 and back == means
    p.write_text("a,b\n1\n")
    with pytest.raises(EvalDataError, match="x.csv"):
        read_results_csv(p)


def test_expand_requests_and_judge_sample(tmp_path):
    p = _write(tmp_path / "comment_test.json", [_rec(1, answer="ANSWER-A"), _rec(2)])
    recs, _ = load_answers_file(p, set_name="out-test", dialogue_type="comment")
    reqs = expand_requests(recs)
    assert [r.key for r in reqs[:8]] == [("R_comment_COCO_1", m) for m in METRICS]
    assert len({r.key for r in reqs}) == len(reqs) == 16
    sub = expand_requests(recs, ["Tone Consistency", "Fluency"])
    assert [r.metric for r in sub[:2]] == ["Fluency", "Tone Consistency"]
    with pytest.raises(ValueError, match="unknown metric"):
        expand_requests(recs, ["Fluent"])
    with pytest.raises(ValueError, match="duplicate sample id"):
        expand_requests(recs + recs[:1])
    tpl = load_judge_template()
    s = build_judge_sample(reqs[3], tpl)
    assert s.dialogue_type == "judge" and s.group == "out-of-distribution" and s.image == "COCO/1.jpg"
    assert "question 1" in s.user_text and tpl.metrics[METRICS[3]] in s.user_text
    assert s.user_text.index("ANSWER-A") < s.user_text.index("truth 1")
    # The metric-specific text is at the end: one answer's 8 prompts share everything before it (a local judge
    # prefills that prefix once), here all but the last few hundred characters.
    prompts = [build_judge_sample(r, tpl).user_text for r in reqs[:8]]
    common = os.path.commonprefix(prompts)
    assert common.index("ANSWER-A") > 0 and common.index("truth 1") > 0
    assert all(len(p) - len(common) < 500 for p in prompts)
    sw = expand_requests(recs[:1], swapped=True)[0]
    ss = build_judge_sample(sw, tpl)
    assert ss.user_text.index("truth 1") < ss.user_text.index("ANSWER-A") and ss.id.endswith("::swapped")
    # a swapped reply is stored un-swapped: score_a is the model under test
    r = result_from_reply(sw, "[Scores]: (9, 6)")
    assert (r.score_a, r.score_b, r.swapped) == (6.0, 9.0, True)
    r0 = result_from_reply(sw, "[Scores]: (0, 6)")  # the reference got 0: undefined ratio, a failure
    assert not r0.ok and "B) is 0" in r0.error
    rm = rm_training_sample(reqs[0], result_from_reply(reqs[0], "fine [Scores]: (7, 8)"), tpl)
    assert rm.target == "fine [Scores]: (7, 8)"
    with pytest.raises(ValueError, match="not training data"):
        rm_training_sample(reqs[0], result_from_reply(reqs[0], "no"), tpl)


def test_judge_template_validation(tmp_path, monkeypatch):
    t = load_judge_template()
    assert set(t.metrics) == set(METRICS)
    p = tmp_path / "j.yaml"
    p.write_text("system: s\nprompt: '{question} {answer_a} {answer_b}'\nmetrics: {}\n")
    with pytest.raises(JudgeTemplateError, match="metrics missing"):
        load_judge_template(p)
    import yaml

    good = {
        "system": "s",
        "prompt": "{question}|{answer_a}|{answer_b}|{metric_description}|{bogus}",
        "metrics": {m: "d" for m in METRICS},
    }
    p.write_text(yaml.safe_dump(good))
    with pytest.raises(JudgeTemplateError, match="unknown placeholder"):
        load_judge_template(p)
    good["prompt"] = "{question}|{answer_a}|{answer_b}|{metric_description}"
    p.write_text(yaml.safe_dump(good))
    monkeypatch.setenv("MMROLE_JUDGE_TEMPLATE", str(p))
    t2 = load_judge_template()
    assert t2.render(question="q", answer_a="a", answer_b="b", metric="Fluency") == "q|a|b|d"


def test_published_answers_expand_and_our_reviews_writer_matches_published_bytes(tmp_path):
    """Published answers + the published scores, written by our writer, give the published reviews file."""
    from mmrole.eval.pipeline import load_answers_dir

    eval_dir = _sample_eval_dir()
    answers, stats = load_answers_dir(eval_dir, "gpt-4-turbo")
    assert len(stats) == 6 and sum(s.n_in for s in stats) == sum(s.n_out for s in stats) == 294
    reqs = expand_requests(answers)
    assert len(reqs) == len({r.key for r in reqs}) == 294 * 8
    assert {a.set_name for a in answers} == {"in-test", "out-test"}
    for set_name, dtype in (("in-test", "inter-role"), ("out-test", "comment")):
        published = eval_dir / f"{set_name}_reviews" / "gpt-4-turbo" / f"{dtype}_test.json"
        recs, _ = load_reviews_file(published)
        results = {
            (r.id, m): JudgeResult(r.id, m, True, e.score[0], e.score[1], review=e.review)
            for r in recs
            for m, e in r.reviews.items()
        }
        mine = [a for a in answers if (a.set_name, a.dialogue_type) == (set_name, dtype)]
        out = tmp_path / f"{set_name}_{dtype}.json"
        write_reviews_file(out, mine, results)
        assert out.read_bytes() == published.read_bytes()
