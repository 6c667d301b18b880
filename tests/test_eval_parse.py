"""Judge reply parser: every published review, the forms judges produce, and replies that must fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_data import sample_eval_dir as _sample_eval_dir

from mmrole.eval.metrics import METRICS
from mmrole.eval.parse import ScoreParseError, check_pair, parse_scores, try_parse_scores

REPO = Path(__file__).resolve().parents[1]


def test_every_published_review_parses_to_its_stored_score():
    files = sorted(_sample_eval_dir().glob("*-test_reviews/*/*_test.json"))
    assert len(files) == 18
    n, failures, mismatches, keys = 0, [], [], set()
    for f in files:
        for rec in json.loads(f.read_text(encoding="utf-8")):
            keys.update(rec["rm_review"])
            for metric, v in rec["rm_review"].items():
                n += 1
                pair, reason = try_parse_scores(v["review"])
                if pair is None:
                    failures.append((f.name, rec["id"], metric, reason))
                elif pair != tuple(v["score"]):
                    mismatches.append((f.name, rec["id"], metric, pair, v["score"]))
    assert n == 294 * 3 * 8
    assert failures == []
    assert mismatches == []
    assert keys == set(METRICS)  # our metric keys are the published ones, exactly


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Both are good. [Scores]: (8, 9)", (8, 9)),
        ("Both are good. [Scores]: 10, 10", (10, 10)),  # no parentheses (2 published reviews do this)
        ("**[Scores]:** (7.5, 9)", (7.5, 9)),  # decimals, markdown
        ("[Scores]**: 6 and 7", (6, 7)),
        ("[Scores]: (8/10, 9/10)", (8, 9)),
        ("[Scores]: (Model A: 8, Model B: 9)", (8, 9)),
        ("[Score]: [4; 6]", (4, 6)),
        ("[Scores]: (7, 9). Model B is slightly better overall.", (7, 9)),  # extra text after the pair
        ("Model A: 7\nModel B: 9", (7, 9)),
        ("Model A's score: 7. Model B's score - 9/10", (7, 9)),
        ("Assistant A = 3, Assistant B = 5", (3, 5)),
        ("A is weaker here.\n(6, 8)", (6, 8)),  # a bare pair on the last line
        ("[分数] ignored. [Scores]：（7，8）", (7, 8)),  # full-width punctuation
        ("Scores: 5 vs 6", (5, 6)),
        ("[Scores]: (9, 9)\n\nFormat: [Scores]: (score of Model A, score of Model B)", (9, 9)),  # echoed format
        ("[Scores]: (7, 9) draft ... [Scores]: (7.0, 9)", (7, 9)),  # several markers, the same pair
        ("（8，9）", (8, 9)),  # full-width, on the last line
        ("比较如下。[Scores]：（8，9）。", (8, 9)),  # Chinese punctuation around the pair
        ("[Scores]: (8.5, 9.25) as explained above.", (8.5, 9.25)),
        ("[Scores]: (10/10, 7/10)", (10, 7)),
        ("[Scores]: (7, 9) even though the scores 3 and 4 came up", (7, 9)),  # bracketed marker beats the word
        ("[Scores]: (0, 5)", (0, 5)),  # A = 0 is a legal (terrible) score
    ],
)
def test_accepted_forms(text, expected):
    assert parse_scores(text) == tuple(float(x) for x in expected)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("Model A is better than Model B.", "no score pair"),
        ("[Scores]: (A, B)", "no score pair"),
        ("[Scores]: (score of Model A, score of Model B)", "no score pair"),
        ("[Scores]: (8)", "no score pair"),
        ("dss sdf 8 9 sdfsdf", "no score pair"),
        ("[Scores]: 89", "ambiguous"),  # concatenated digits: (8, 9)? (89 out of range)? never guessed
        ("Scores: 85", "ambiguous"),
        ("[Scores]: 8 9", "ambiguous"),  # no separator
        ("[Scores]: 8. The reference deserves 9.", "ambiguous"),  # two sentences
        ("[Scores]: (8, 9, 7)", "no score pair"),  # a third number
        ("[Scores]: (3, 4) earlier draft ... [Scores]: (7, 9)", "several markers give different pairs"),
        ("Model A: 7, then Model A: 8; Model B: 9", "several scores for Model A"),
        ("[Scores]: (8/5, 9/5)", "no score pair"),  # out of 5: not our scale, not guessed
        ("[Scores]: (8, 0)", "B is 0"),
        ("[Scores]: (11, 3)", "outside"),
        ("[Scores]: (-2, 3)", "outside"),
        ("[Scores]: (7, 12.5)", "outside"),
    ],
)
def test_rejected_replies(text, reason):
    with pytest.raises(ScoreParseError) as ei:
        parse_scores(text)
    assert reason in ei.value.reason
    pair, why = try_parse_scores(text)
    assert pair is None and reason in why


def test_b_zero_can_be_left_to_the_caller():
    assert parse_scores("[Scores]: (6, 0)", require_positive_b=False) == (6.0, 0.0)


def test_check_pair_validates_stored_scores():
    assert check_pair([8.0, 9]) == (8.0, 9.0)
    for bad in ([8], [8, 0], ["x", 1], None, [3, 11]):
        with pytest.raises(ScoreParseError):
            check_pair(bad)
