"""Judge agreement (mmrole eval agreement), the report's bias section and plots that read well with many models."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from sample_data import sample_eval_dir

from mmrole.eval.agreement import compare, load_judgements, pearson, spearman
from mmrole.eval.contract import JudgeResult
from mmrole.eval.metrics import METRICS
from mmrole.eval.report import build_report, model_styles, radial_range, render_markdown, write_report
from mmrole.eval.store import ResultsStore


def test_correlations_match_numpy_with_ties():
    rng = random.Random(0)
    x = [rng.choice([0.5, 0.8, 1.0, 1.25]) for _ in range(50)]
    y = [v + rng.random() * 0.3 for v in x]
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])

    def avg_ranks(v):
        v = np.asarray(v)
        r = np.empty(len(v))
        for u in np.unique(v):
            idx = np.where(v == u)[0]
            r[idx] = np.argsort(np.argsort(v, kind="stable"), kind="stable")[idx].mean() + 1
        return r

    assert spearman(x, y) == pytest.approx(np.corrcoef(avg_ranks(x), avg_ranks(y))[0, 1])
    assert pearson([1, 1, 1], [1, 2, 3]) is None  # undefined, not 0


def test_agreement_of_reviews_with_rm_data_built_from_them(tmp_path):
    from mmrole.train.rm_data import build_rm_data, find_review_files

    eval_dir = sample_eval_dir()
    files = [f for f in find_review_files(eval_dir) if "/gpt-4-turbo/" in f.as_posix()]
    build_rm_data(files, tmp_path, test_fraction=0.0, shuffle=False)
    rm = tmp_path / "RM_data" / "train" / "rm_train.json"
    a, fa = load_judgements(eval_dir)
    b, fb = load_judgements(rm)
    assert len(b) == 294 * 8 and fa == fb == 0
    same = compare(a, b)
    assert same.n_common == 294 * 8
    assert all(s.pearson == pytest.approx(1.0) and s.exact_a == s.exact_b == 1.0 for s in same.stats)
    # Judge B gives the answer under test one point more on Fluency for every third sample.
    recs = json.loads(rm.read_text(encoding="utf-8"))
    bumped = 0
    for i, r in enumerate(x for x in recs if x["id"].endswith("::Fluency")):
        if i % 3 == 0:
            text = r["conversations"][1]["value"]
            m = list(re.finditer(r"\((\d+(?:\.\d+)?), (\d+(?:\.\d+)?)\)", text))[-1]
            new_a = float(m.group(1)) + 1 if float(m.group(1)) < 10 else float(m.group(1)) - 1
            r["conversations"][1]["value"] = text[: m.start()] + f"({new_a:g}, {m.group(2)})" + text[m.end() :]
            bumped += 1
    changed = tmp_path / "rm_changed.json"
    changed.write_text(json.dumps(recs), encoding="utf-8")
    ag = compare(a, load_judgements(changed)[0])
    flu = next(s for s in ag.stats if s.metric == "Fluency")
    assert flu.exact_a == pytest.approx(1 - bumped / 294) and flu.exact_b == 1.0 and flu.within1_a == 1.0
    assert flu.pearson < 1.0 and flu.mean_abs_ratio_diff > 0
    other = next(s for s in ag.stats if s.metric == "Coherency")
    assert other.exact_a == 1.0


def test_agreement_cli_outputs(tmp_path, capsys):
    from mmrole.cli import main

    store = tmp_path / "judge_results" / "gpt-4-turbo.jsonl"
    ResultsStore(store).append(
        [JudgeResult("Iron_Man_comment_COCO_30_1", m, True, 7.0, 8.0) for m in METRICS]
        + [JudgeResult("nope", "Fluency", False, error="unparsable")]
    )
    assert main(["eval", "agreement", str(sample_eval_dir()), str(store), "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_common"] == 8 and d["failed_b"] == 1 and d["metrics"][-1]["metric"] == "all"
    assert main(["eval", "agreement", str(sample_eval_dir()), str(store), "--out", str(tmp_path / "ag")]) == 0
    assert {p.name for p in (tmp_path / "ag").iterdir()} >= {"agreement.md", "agreement.csv", "agreement.json"}
    assert main(["eval", "agreement", str(store), str(tmp_path / "missing.json")]) == 2


def test_report_bias_section_and_many_model_plots(tmp_path):
    eval_dir = sample_eval_dir()
    rep = build_report(eval_dir, bootstrap=50)
    assert {b.model for b in rep.length_bias} == {"gpt-4-turbo", "mmrole-agent", "qwen-vl-chat"}
    b = rep.length_bias[0]
    assert b.n == 294 and len(b.quartile_means) == 4 and sum(q[2] for q in b.quartile_means) == 294
    assert [q[0] for q in b.quartile_means] == sorted(q[0] for q in b.quartile_means)
    md = render_markdown(rep)
    assert "Bias: score vs answer length" in md and "position consistency" not in md
    # A swapped-order run of one model adds position consistency.
    work = tmp_path / "eval"
    import shutil

    shutil.copytree(eval_dir, work)
    normal, swapped = (
        ResultsStore(work / "judge_results" / "m.jsonl"),
        ResultsStore(work / "judge_results" / "m.swapped.jsonl"),
    )
    normal.append([JudgeResult(f"s{i}", "Fluency", True, 8.0, 8.0) for i in range(4)])
    swapped.append([JudgeResult(f"s{i}", "Fluency", True, 6.0 + i, 8.0, swapped=True) for i in range(4)])
    rep2 = build_report(work, bootstrap=0)
    md2 = render_markdown(rep2)
    assert "position consistency" not in md2  # no reviews for "m": not a model of this report
    # Styles stay distinct with many models; the radar's radius is fitted to the data.
    styles = model_styles(25)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 25
    lo, hi = radial_range([0.82, 1.1, 0.95])
    assert 0.7 < lo < 0.82 and 1.1 < hi < 1.2
    paths = write_report(rep, tmp_path / "out", radar_models=["mmrole-agent"])
    names = {p.name for p in paths}
    assert {"radar.png", "dimensions.png", "leaderboard.png", "heatmap.png"} <= names
    assert "bias" in json.loads((tmp_path / "out" / "report.json").read_text())


def test_position_consistency_in_report(tmp_path):
    import shutil

    work = tmp_path / "eval"
    shutil.copytree(sample_eval_dir(), work)
    ids = [r["id"] for r in json.loads((work / "in-test_reviews" / "qwen-vl-chat" / "comment_test.json").read_text())]
    normal = ResultsStore(work / "judge_results" / "qwen-vl-chat.jsonl")
    swapped = ResultsStore(work / "judge_results" / "qwen-vl-chat.swapped.jsonl")
    normal.append([JudgeResult(i, "Fluency", True, 8.0, 8.0) for i in ids[:4]])
    swapped.append([JudgeResult(i, "Fluency", True, 9.0, 8.0, swapped=True) for i in ids[:4]])
    rep = build_report(work, bootstrap=0)
    assert rep.position["qwen-vl-chat"]["all"].n_pairs == 4
    assert rep.position["qwen-vl-chat"]["all"].preference_flip_rate == 1.0
    assert "position consistency" in render_markdown(rep)


def test_rm_data_ids_without_metric_take_it_from_the_prompt(tmp_path):
    from sample_data import mmrole_sample_dir, require

    from mmrole.eval.contract import JudgeRequest, build_judge_sample
    from mmrole.eval.formats import EvalDataError
    from mmrole.eval.template_loader import load_judge_template

    t = load_judge_template(require(mmrole_sample_dir() / "original" / "RM_review.py"))
    recs = []
    for m in ("Fluency", "Tone Consistency"):
        req = JudgeRequest("Iron_Man_comment_COCO_30_1", m, "q", "a", "b", "i.jpg", role="Iron Man", script="S")
        s = build_judge_sample(req, t)
        user = f"Picture 1: <img>i.jpg</img>\n{s.user_text}"
        recs.append(
            {
                "id": req.sample_id,
                "conversations": [{"value": user}, {"value": f"fine [Scores]: (6, {8 + (m == 'Fluency')})"}],
            }
        )
    p = tmp_path / "rm_test.json"
    p.write_text(json.dumps(recs), encoding="utf-8")
    got, failed = load_judgements(p)
    assert failed == 0
    assert got == {
        ("", "Iron_Man_comment_COCO_30_1", "Fluency"): (6.0, 9.0),
        ("", "Iron_Man_comment_COCO_30_1", "Tone Consistency"): (6.0, 8.0),
    }
    # Matched by (sample, metric) against a model's reviews when the RM data carries no model name.
    ag = compare(load_judgements(sample_eval_dir())[0], got)
    assert ag.n_common == 2 * 3  # the sample's three models each have that sample
    recs[0]["conversations"][0]["value"] = "no metric named here"
    p.write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(EvalDataError, match="names no metric"):
        load_judgements(p)
