"""Aggregation: the published per-file CSVs and overall scores are reproduced; failures, weighting,
bootstrap and position bias behave."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_data import sample_eval_dir as _sample_eval_dir

from mmrole.eval.aggregate import ALL, ScoreRow, position_bias, rows_from_reviews, summarize
from mmrole.eval.contract import JudgeResult
from mmrole.eval.formats import format_results_csv, load_reviews_file, read_results_csv
from mmrole.eval.metrics import DIMENSIONS, METRICS
from mmrole.eval.report import build_report, discover

REPO = Path(__file__).resolve().parents[1]
# The published overall scores (README of the sample; mean of the 8 metric means over all 294 test samples).
PUBLISHED_OVERALL = {"mmrole-agent": 0.994, "gpt-4-turbo": 1.099, "qwen-vl-chat": 0.843}


@pytest.fixture(scope="module")
def sample_report():
    return build_report(_sample_eval_dir(), bootstrap=200, seed=0)


def test_per_file_means_reproduce_published_csvs_exactly(sample_report):
    eval_dir = _sample_eval_dir()
    published = discover(eval_dir, "results", "csv")
    assert len(published) == 18
    ours = {(f.model, f.set_name, f.dialogue_type): f for f in sample_report.files}
    assert set(ours) == {(p.model, p.set_name, p.dialogue_type) for p in published}
    for p in published:
        fr = ours[(p.model, p.set_name, p.dialogue_type)]
        count, means = read_results_csv(p.path)
        assert fr.count == count
        assert fr.stat.means() == means  # float equality, not approx
        # and the file we would write is byte-identical (header, float repr, CRLF)
        assert format_results_csv(fr.count, fr.stat.means()).encode() == p.path.read_bytes()


def test_overall_scores_match_published_numbers(sample_report):
    overall = {g.model: g for g in sample_report.overall}
    assert set(overall) == set(PUBLISHED_OVERALL)
    for model, pub in PUBLISHED_OVERALL.items():
        g = overall[model]
        assert g.n_samples == 294 and g.n_failed == 0
        assert abs(g.overall - pub) <= 0.001, (model, g.overall, pub)
        assert g.overall == pytest.approx(sum(g.metrics[m].mean for m in METRICS) / 8)
        lo, hi = g.overall_ci
        assert lo < g.overall < hi and hi - lo < 0.1


def test_set_means_are_sample_weighted_over_files(sample_report):
    for g in sample_report.by_set:
        files = [f for f in sample_report.files if (f.model, f.set_name) == (g.model, g.set_name)]
        assert sum(f.count for f in files) == g.n_samples
        for m in METRICS:
            weighted = sum(f.count * f.stat.metrics[m].mean for f in files) / g.n_samples
            assert g.metrics[m].mean == pytest.approx(weighted, abs=1e-12)
    # and the all-sets mean is the weighted mean of the two sets (216 + 78 samples)
    for g in sample_report.overall:
        sets = [s for s in sample_report.by_set if s.model == g.model]
        assert sorted(s.n_samples for s in sets) == [78, 216]
        for m in METRICS:
            w = sum(s.n_samples * s.metrics[m].mean for s in sets) / g.n_samples
            assert g.metrics[m].mean == pytest.approx(w, abs=1e-12)


def test_dimensions_and_characters(sample_report):
    for g in sample_report.overall:
        for d, ms in DIMENSIONS.items():
            assert g.dimensions[d] == pytest.approx(sum(g.metrics[m].mean for m in ms) / len(ms))
    roles = {g.role for g in sample_report.by_character if g.model == "mmrole-agent"}
    assert len(roles) == 85
    assert sum(g.n_samples for g in sample_report.by_character if g.model == "mmrole-agent") == 294
    types = [g for g in sample_report.by_type if g.model == "qwen-vl-chat"]
    assert [t.dialogue_type for t in types] == ["comment", "human-role", "inter-role"]
    assert all(t.n_samples == 98 for t in types)


def _rows(spec):
    """spec: list of (set, type, id, role, {metric: ratio or None})."""
    rows = []
    for set_name, dtype, sid, role, vals in spec:
        for m in METRICS:
            v = vals.get(m, 1.0)
            rows.append(ScoreRow("m", set_name, dtype, sid, role, m, v, None if v is not None else "unparsable"))
    return rows


def test_failures_are_excluded_and_counted_never_zero():
    rows = _rows(
        [
            ("in-test", "comment", "a", "R", {"Fluency": 0.5}),
            ("in-test", "comment", "b", "R", {"Fluency": None}),
            ("in-test", "comment", "c", "R", {"Fluency": 1.5}),
        ]
    )
    (g,) = summarize(rows)
    assert g.metrics["Fluency"].mean == 1.0  # (0.5 + 1.5) / 2, not (0.5 + 0 + 1.5) / 3
    assert g.metrics["Fluency"].n == 2 and g.metrics["Fluency"].n_failed == 1
    assert g.n_failed == 1 and g.failures == {"unparsable": 1}
    assert g.n_samples == 3


def test_metric_with_no_valid_score_has_no_mean_and_no_overall():
    rows = _rows([("in-test", "comment", "a", "R", {"Coherency": None})])
    (g,) = summarize(rows, bootstrap=50)
    assert g.metrics["Coherency"].mean is None and g.overall is None
    assert g.dimensions["Fundamental Conversational Skills"] is None
    assert g.dimensions["Multimodal Understanding"] == 1.0


def test_bootstrap_is_seeded_and_stratified():
    import random

    rnd = random.Random(1)
    spec = [
        ("in-test", t, f"{t}{i}", "R", {m: rnd.uniform(0.5, 1.5) for m in METRICS})
        for t in ("comment", "human-role")
        for i in range(30)
    ]
    rows = _rows(spec)
    a = summarize(rows, bootstrap=300, seed=7)[0]
    b = summarize(rows, bootstrap=300, seed=7)[0]
    c = summarize(rows, bootstrap=300, seed=8)[0]
    assert a.overall_ci == b.overall_ci and a.overall_ci != c.overall_ci
    for m in METRICS:
        lo, hi = a.metrics[m].ci
        assert lo <= a.metrics[m].mean <= hi
    # a constant stratum contributes no variance: with all ratios equal, the CI collapses
    const = _rows([("in-test", "comment", f"x{i}", "R", {}) for i in range(10)])
    (g,) = summarize(const, bootstrap=100)
    assert g.overall_ci == (1.0, 1.0)


def test_group_by_validation():
    with pytest.raises(ValueError, match="cannot group"):
        summarize([], by=("nope",))


def _res(sid, metric, a, b, swapped=False):
    return JudgeResult(sid, metric, True, float(a), float(b), swapped=swapped)


def test_position_bias_reports_difference_and_flips():
    orig = {
        ("s1", "Fluency"): _res("s1", "Fluency", 8, 8),
        ("s2", "Fluency"): _res("s2", "Fluency", 9, 6),
        ("s3", "Fluency"): _res("s3", "Fluency", 5, 10),
    }
    swap = {("s1", "Fluency"): _res("s1", "Fluency", 6, 8, True), ("s2", "Fluency"): _res("s2", "Fluency", 9, 6, True)}
    bias = position_bias(orig, swap)
    b = bias["Fluency"]
    assert b.n_pairs == 2  # s3 has no swapped counterpart
    assert b.mean_original == pytest.approx((1 + 1.5) / 2)
    assert b.mean_swapped == pytest.approx((0.75 + 1.5) / 2)
    assert b.diff == pytest.approx(0.125)
    assert b.preference_flip_rate == 0.5  # s1: tie -> B preferred
    assert bias[ALL].n_pairs == 2 and bias["Tone Consistency"].n_pairs == 0


def test_rows_from_reviews_keeps_file_order(tmp_path):
    f = next(iter(sorted(_sample_eval_dir().glob("out-test_reviews/qwen-vl-chat/comment_test.json"))))
    recs, st = load_reviews_file(f, set_name="out-test", dialogue_type="comment")
    assert (st.n_in, st.n_out, st.rejected) == (26, 26, [])
    rows = rows_from_reviews(recs, "qwen-vl-chat")
    assert [r.sample_id for r in rows[::8]] == [r.id for r in recs]
    assert len(rows) == 26 * 8
