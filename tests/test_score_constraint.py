"""Constrained score decoding (``judge.constrained_scores``): the score-line grammar over any vocabulary always
yields a pair the parser reads; a random-weight tiny judge under the mask gives a parseable pair for every request,
greedy or sampled; the option is in the cache key (and absent when off) and recorded for the report."""

from __future__ import annotations

import json
import random

import pytest

from mmrole.eval.parse import parse_scores
from mmrole.eval.score_constraint import END_DONE, RowConstraint, ScoreGrammar, score_format

# A toy vocabulary: every character the line needs, some multi-character tokens, and noise; 0 is the end token.
VOCAB = ["<eos>", *"\n[Scores]: (0123456789,)", "10", ", ", "[Sc", "ores", "]:", " (", "hello", " world", "[x", "a[b"]


def _walk(grammar: ScoreGrammar, max_new: int, rng: random.Random, review: list[int]) -> str:
    """Generate like ``generate`` would: the free ``review`` tokens while allowed, then random allowed tokens."""
    row = RowConstraint(grammar, max_new)
    text, n = "", 0
    while not row.done and n < max_new:
        want = review[n] if n < len(review) else 0  # the "model" wants its review, then to end
        allowed = row.next_allowed(want, n)
        if allowed is None:
            assert want not in grammar.banned_in_review
            tok = want
        else:
            tok = rng.choice(allowed)
        row.consume(tok)
        text += "" if tok == 0 else VOCAB[tok]
        n += 1
    assert row.done and not row.broken, text
    return text


def test_grammar_always_ends_in_one_parseable_pair():
    g = ScoreGrammar(VOCAB, eos_ids=[0])
    rng = random.Random(0)
    hello, world, bracket = VOCAB.index("hello"), VOCAB.index(" world"), VOCAB.index("[x")
    seen = set()
    for _ in range(300):
        review = [rng.choice([hello, world, bracket]) for _ in range(rng.randint(0, 40))]
        max_new = rng.randint(g.max_tokens, 50)
        text = _walk(g, max_new, rng, review)
        assert text.count("[") == 1 and text.endswith(")")  # the review never opened a "[" of its own
        a, b = parse_scores(text)
        assert 1 <= a <= 10 and 1 <= b <= 10
        seen.add((a, b))
    assert len(seen) > 20  # the scores are chosen, not fixed
    # worst case: one token per character of "\n[Scores]: (10, 10)" plus the end token, never more
    assert g.max_tokens <= len("\n[Scores]: (10, 10)") + 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        RowConstraint(g, g.max_tokens - 1)
    with pytest.raises(ValueError, match="no single token"):
        ScoreGrammar([t for t in VOCAB if t != "7"], eos_ids=[0])
    assert g.advance(g.start, VOCAB.index("hello")) is None and g.allowed(END_DONE) == [0]


def test_tiny_random_judge_under_the_mask_always_parses(tiny_models, tmp_path):
    pytest.importorskip("torch")
    from PIL import Image

    from mmrole.eval.contract import expand_requests
    from mmrole.eval.formats import AnswerRecord
    from mmrole.eval.judges import VLMJudge
    from mmrole.models import GenerationParams, VLMConfig, build_vlm

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "0.png")
    answers = [
        AnswerRecord(
            id=f"s{i}",
            question=f"Tell me about the picture ({i}).",
            reference="A red square.",
            answer="Red!" * (i + 1),
            image="0.png",
            role="Captain Nova",
            other_role="a curious human",
            set_name="in-test",
            dialogue_type="comment",
        )
        for i in range(1)
    ]
    reqs = expand_requests(answers)
    vlm = build_vlm(VLMConfig(model_path=tiny_models["judge"], device="cpu", max_length=2048))
    free = VLMJudge(vlm, GenerationParams(max_new_tokens=24, seed=0), max_retries=0, images_root=str(images))
    assert not any(r.ok for r in free.score_batch(reqs[:2]))  # a random model does not write the pair itself
    for params in (GenerationParams(max_new_tokens=24, seed=0), GenerationParams(max_new_tokens=32, do_sample=True)):
        judge = VLMJudge(vlm, params, max_retries=0, images_root=str(images), constrained_scores=True)
        results = judge.score_batch(reqs)
        assert len(results) == 8 and all(r.ok for r in results), [r.error for r in results if not r.ok]
        for r in results:
            assert r.review.count("[Scores]") == 1 and parse_scores(r.review) == (r.score_a, r.score_b)
            assert 1 <= r.score_a <= 10 and 1 <= r.score_b <= 10
    with pytest.raises(ValueError, match="max_new_tokens"):
        VLMJudge(vlm, GenerationParams(max_new_tokens=4), images_root=str(images), constrained_scores=True)


def test_option_is_in_the_cache_key_and_the_judge_settings_record(tmp_path):
    from mmrole.config import ConfigError
    from mmrole.eval.cache_keys import digest, judge_identity
    from mmrole.eval.job_config import JudgeSettings
    from mmrole.eval.judge_settings import read_judge_settings, render_judges, write_judge_settings
    from mmrole.eval.metrics import METRICS
    from mmrole.eval.report import SHORT
    from mmrole.models import VLMConfig

    model = VLMConfig(model_path=str(tmp_path / "rm"), device="cpu")
    off = JudgeSettings(kind="local", model=model)
    on = JudgeSettings(kind="local", model=model, constrained_scores=True)
    assert "constrained_scores" not in judge_identity(off)  # stores written before the option keep their keys
    assert judge_identity(on)["constrained_scores"] == score_format()
    assert digest(judge_identity(on)) != digest(judge_identity(off))
    with pytest.raises(ConfigError, match="constrained_scores"):
        JudgeSettings(kind="serve", serve_url="http://x", constrained_scores=True)

    store = tmp_path / "judge_results" / "m.jsonl"
    store.parent.mkdir()
    write_judge_settings(store, off, METRICS[:2])
    path = write_judge_settings(store, on, METRICS[2:])  # merged: the first two metrics keep "free"
    assert path.name == "m.judge.json"
    rec = json.loads(path.read_text())
    assert [rec["metrics"][m]["score_pair"] for m in METRICS] == ["free"] * 2 + ["constrained"] * 6
    (line,) = [x for x in render_judges(read_judge_settings(tmp_path, ["m"]), SHORT) if x.startswith("- m:")]
    assert "constrained score decoding (judge.constrained_scores) for Coh, ITR, RA, PC, KC, TC" in line
    assert "parsed from the free review text for IA, Flu" in line and "m.judge.json" in line
