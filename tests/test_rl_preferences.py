"""jobs/build_preferences.py on the demo data: a tiny agent samples K answers per prompt on Ray Data, an
OpenAI-compatible fake judge (scores a hash of the request; fails some replies, and every reply about one prompt)
scores them through the eval scoring path; counts, reasons and seeded determinism across Ray batchings."""

from __future__ import annotations

import json

import pytest
from fake_chat_server import FakeChatServer, text_hash

from mmrole.rl.preferences import (
    Candidate,
    PreferenceJobConfig,
    choose_pair,
    load_preference_config,
    row_seed,
)

METRICS = ["Fluency", "Tone Consistency"]
ROWS = 12


class FakeJudge(FakeChatServer):
    """POST /v1/chat/completions: ``[Scores]: (A, 8)`` with A a hash of the request; a reply with no score pair
    for a sixth of the requests and for every request whose text holds ``poison`` (one prompt's ground truth)."""

    def __init__(self, poison: str):
        def reply(body: dict) -> str:
            text = json.dumps(body["messages"], sort_keys=True, ensure_ascii=False)
            h = text_hash(text)
            return "I cannot decide." if h % 6 == 0 or poison in text else f"Compared. [Scores]: ({1 + h % 9}, 8)"

        super().__init__(reply)


def _cfg(tiny_models, demo_prepared, judge_url, out, *extra) -> PreferenceJobConfig:
    return load_preference_config(
        None,
        [
            f"agent.model_path={tiny_models['agent']}",
            "agent.max_length=530",  # the demo prompts of 531+ tokens do not fit: rejected as too long
            "judge.kind=openai",
            "judge.openai.model=fake-judge",
            f"judge.openai.base_url={judge_url}",
            "judge.openai.api_key_env=null",
            "judge.openai.require_api_key=false",
            "judge.openai.max_retries=0",
            "judge.openai.max_http_retries=0",
            f"data.prepared={demo_prepared}",
            f"data.max_rows={ROWS}",
            f"out={out}",
            "samples_per_prompt=3",
            "generation.max_new_tokens=6",
            "generation.min_new_tokens=2",
            f"metrics={json.dumps(METRICS)}",
            "max_reject_ratio=0.8",
            "agent_pool.concurrency=[1]",
            "agent_pool.num_cpus=0.5",
            "judge_pool.concurrency=[1]",
            "judge_pool.num_cpus=0.5",
            "judge_pool.batch_size=6",
            "progress=false",
            *extra,
        ],
    )


def test_pair_choice_and_reasons_pure():
    from mmrole.data.records import Sample

    s = Sample("a", "sys", "q", "x.png", "truth", "R", "O", "S", "comment", 1)
    m = ["Fluency"]
    cands = [Candidate(0, "x", ratios={"Fluency": 0.5}), Candidate(1, "y", ratios={"Fluency": 1.2})]
    cands.append(Candidate(2, "z", judge_errors={"Fluency": "unparsable"}))
    row = choose_pair(s, cands, m, 0.0)
    assert row.pair["chosen"] == "y" and row.pair["rejected"] == "x" and row.pair["scored"] == 2
    assert choose_pair(s, cands, m, 0.7).reason == "tie"
    assert choose_pair(s, cands[1:], m, 0.0).reason == "too_few_scored"
    assert choose_pair(s, cands[2:], m, 0.0).reason == "judge_failed"
    too_long = [Candidate(0, "", "prompt: SampleTooLong: too long"), Candidate(1, "", "prompt: SampleTooLong: x")]
    assert choose_pair(s, too_long, m, 0.0).reason == "too_long"
    assert choose_pair(s, [Candidate(0, ""), Candidate(1, " ")], m, 0.0).reason == "generation_failed"
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(1, "a")


def test_config_refuses_what_cannot_make_pairs(tiny_models, demo_prepared):
    from mmrole.config import ConfigError

    for bad, key in (
        ("samples_per_prompt=1", "samples_per_prompt"),
        ("generation.do_sample=false", "generation.do_sample"),
        ("metrics=[Charm]", "metrics"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _cfg(tiny_models, demo_prepared, "http://127.0.0.1:1/v1", "/tmp/x", bad)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_build_preferences_counts_reasons_and_seeded_reruns(ray_local, tiny_models, demo_prepared, tmp_path):
    import pyarrow.parquet as pq

    from mmrole.data.prepared import iter_samples, load_manifest
    from mmrole.ray_preferences import run_preferences
    from mmrole.train.row_encoder import SplitRows

    samples = list(iter_samples(demo_prepared, "train"))[:ROWS]
    poisoned = samples[0]
    judge = FakeJudge(poisoned.target[:60])
    try:
        a = run_preferences(_cfg(tiny_models, demo_prepared, judge.url, tmp_path / "a", "agent_pool.batch_size=4"))
        # Same seed, other Ray batching: the same answers, the same pairs.
        b = run_preferences(_cfg(tiny_models, demo_prepared, judge.url, tmp_path / "b", "agent_pool.batch_size=2"))
    finally:
        judge.close()

    # Counts add up, every prompt is accounted for, reasons named.
    assert a["in"] == ROWS and a["out"] + a["rejected"] == ROWS and a["out"] >= 2, a
    reasons = a["rejected_by_reason"]
    assert reasons.get("too_long") == 3, a  # the 531-, 538- and 558-token prompts of the first 12
    assert reasons.get("judge_failed", 0) >= 1, a  # the poisoned prompt: every reply failed
    assert sum(reasons.values()) == a["rejected"]
    rejects = [json.loads(x) for x in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == a["rejected"] and {r["id"] for r in rejects if r["reason"] == "judge_failed"} >= {
        poisoned.id
    }
    assert all("SampleTooLong" in r["detail"] for r in rejects if r["reason"] == "too_long")
    # Failed judge replies are counted, never scored as zero.
    cands = [json.loads(x) for x in (tmp_path / "a" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == ROWS * 3
    n_failed = sum(len(c["judge_errors"]) for c in cands)
    assert n_failed == a["judge"]["failed"] > 0 and a["judge"]["parsed"] == sum(len(c["ratios"]) for c in cands)
    assert a["judge"]["requests"] == sum(1 for c in cands if c["answer"].strip() and not c["error"]) * len(METRICS)
    assert all(0 < v for c in cands for v in c["ratios"].values())

    # The pairs: chosen scored above rejected, written as a prepared split DPO reads.
    pairs = [json.loads(x) for x in (tmp_path / "a" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == a["out"] and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    m = load_manifest(tmp_path / "a")
    assert m["splits"]["pref_train"]["rows"] == a["out"]
    rows = SplitRows(str(tmp_path / "a"), "pref_train").take(range(a["out"]))
    by_id = {s.id: s for s in samples}
    for r, p in zip(rows, pairs):
        assert r["id"] == p["id"] and r["target"] == p["chosen"] and r["rejected"] == p["rejected"]
        assert r["reference"] == by_id[r["id"]].target and r["user_text"] == by_id[r["id"]].user_text
    assert [r["id"] for r in rows] == [s.id for s in samples if s.id in {p["id"] for p in pairs}]  # manifest order

    # Seeded per prompt: batching did not change a single answer.
    assert {k: v for k, v in b.items() if k not in ("seconds", "out_dir")} == {
        k: v for k, v in a.items() if k not in ("seconds", "out_dir")
    }
    for name in ("candidates.jsonl", "pairs.jsonl", "rejects.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    assert pq.read_table(tmp_path / "a" / "pref_train" / "part-00000.parquet").equals(
        pq.read_table(tmp_path / "b" / "pref_train" / "part-00000.parquet")
    )
    answers = {(c["id"], c["k"]): c["answer"] for c in cands}
    assert len({answers[(s.id, k)] for s in samples[1:4] for k in range(3)}) > 3  # sampled, not greedy copies
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["ok"] and summary["in"] == ROWS and summary["config"]["samples_per_prompt"] == 3
