"""``mmrole data generate --ray``: the teacher stages as Ray Data pipelines (bounded concurrency, cached rerun),
then the generated data through the existing jobs: prepare, a smoke training run, answering and scoring its test
split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from canned_teacher import CannedTeacher, generate, make_images

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHARACTERS = [
    {"name": "Ada Fenwick", "source": "the Victorian era", "raw_text": "Ada Fenwick built clockwork bridges."},
    {"name": "Nora Quist", "source": "hypothetical", "brief": "a lighthouse keeper"},
    {"name": "李青", "source": "江湖传说", "language": "Chinese", "group": "out-of-distribution"},
]


@pytest.mark.timeout(900)
def test_generate_on_ray_then_train_and_score(ray_local, tiny_models, tmp_path):
    from mmrole.data.prepare import prepare
    from mmrole.data.validate import validate
    from mmrole.eval.job_config import GenerateJobConfig, ScoreJobConfig, load_job_config
    from mmrole.eval.metrics import METRICS
    from mmrole.ray_eval import run_generate, run_score
    from mmrole.ray_train import run_training
    from mmrole.train.config import load_config

    make_images(tmp_path / "pics", n=6)
    with CannedTeacher(fail_first_429=True, delay_s=0.05) as t:
        rc, root = generate(tmp_path, CHARACTERS, t.url, "executor=ray", "ray_actors=2", "teacher.max_concurrency=4")
        assert rc == 0
        assert 2 <= t.max_inflight <= 4  # bounded concurrency to the teacher, over 2 actors
        s = json.loads((root / "generate_summary.json").read_text())
        assert s["stages"]["dialogues"]["out"] == 54 and s["stages"]["test_split"]["out"] == 9
        assert s["teacher"]["http_attempts"] == s["teacher"]["requests"] + 6 == t.hits  # 429s retried in the actors
        before = t.hits
        rc, root = generate(tmp_path, CHARACTERS, t.url, "executor=ray")
        assert rc == 0 and t.hits == before  # the rerun is all cache hits: nothing reaches the teacher
    again = json.loads((root / "generate_summary.json").read_text())
    assert again["teacher"]["requests"] == 0 and again["teacher"]["cache_hits"] == s["teacher"]["requests"]
    assert again["stages"] == s["stages"]

    rep = validate(root)
    assert not rep.errors, [str(p) for p in rep.errors]
    prep = tmp_path / "prepared"
    m = prepare(root, prep)
    assert m["counts"]["test"]["out"] == 9

    cfg = load_config(
        REPO / "configs" / "smoke_cpu.yaml",
        [
            "run_name=gen",
            f"output_dir={tmp_path / 'runs'}",
            f"model.model_path={tiny_models['agent']}",
            "tiny_model=null",
            f"data.prepared={prep}",
            "data.max_rows=16",
            "train.max_steps=2",
            "train.global_batch_size=4",
            "checkpoint.every_steps=2",
        ],
    )
    trained = run_training(cfg, quiet=True)
    assert trained.ok and trained.final_step == 2 and trained.final_model

    out = tmp_path / "eval"
    pool = ["pool.concurrency=[1]", "pool.num_cpus=0.5", "pool.batch_size=8"]
    answers = run_generate(
        load_job_config(
            GenerateJobConfig,
            None,
            [
                "model_name=gen-agent",
                f"agent.model_path={trained.final_model}",
                f"data={prep}",
                f"out={out}",
                "generation.max_new_tokens=4",
                *pool,
            ],
        )
    )
    assert answers["samples"] == 9
    scored = run_score(
        load_job_config(
            ScoreJobConfig,
            None,
            [
                f"eval_dir={out}",
                "model_name=gen-agent",
                f"images_root={root / 'images'}",
                f"judge.model.model_path={tiny_models['judge']}",
                "judge.generation.max_new_tokens=4",
                "judge.max_retries=0",
                *pool,
            ],
        )
    )
    assert scored["requests"] == 9 * len(METRICS)
    assert len(list(out.glob("*-test_reviews/gen-agent/*_test.json"))) == 6


@pytest.mark.timeout(600)
def test_our_serve_agent_as_teacher_garbage_is_rejected_and_counted(serve_stack, tmp_path):
    """A tiny random-weight Serve agent (the session's Serve stack) answers garbage: the gates reject it, every count
    adds up, exit 1."""
    from mmrole.datagen.cards import write_card

    make_images(tmp_path / "pics", n=2, corrupt=False)
    card = {
        "spec": "chara_card_v2",
        "data": {
            "name": "Mira Solace",
            "description": "A cartographer of floating islands.",
            "personality": "Curious.",
            "scenario": "",
            "first_mes": "Hello!",
            "mes_example": "",
        },
    }
    chars = [
        {"name": "Mira Solace", "source": "Sky Tales", "card": str(write_card(card, tmp_path / "mira.json"))},
        {"name": "Nora Quist", "source": "hypothetical"},
    ]
    url = serve_stack["agent"] + "/v1"
    rc, root = generate(
        tmp_path, chars, url, "teacher.model=mmrole-agent", "teacher.max_reasks=0", "teacher.max_tokens=48"
    )
    assert rc == 1
    s = json.loads((root / "generate_summary.json").read_text())
    st = s["stages"]
    rej = [json.loads(x) for x in (root / "rejects.jsonl").read_text().splitlines()]
    for name, c in st.items():
        assert c["in"] == c["out"] + c["rejected"] == c["out"] + sum(1 for r in rej if r["stage"] == name), name
    # the card gives Mira a profile without the teacher; the rest is garbage or refused by the agent's API
    assert st["profile"] == {"in": 2, "out": 1, "rejected": 1, "rejected_by_reason": {"no_meta_info": 1}}
    assert st["meta_info"]["rejected"] == 1 and st["annotation"]["rejected"] == 2
    assert st["dialogues"]["in"] == 12 and st["dialogues"]["out"] == 0
    # garbage text (malformed_json), or a prompt too long for the tiny model (http 400)
    assert set(st["dialogues"]["rejected_by_reason"]) <= {
        "malformed_json",
        "refusal",
        "http",
        "no_profile",
        "no_partner",
    }
    assert (
        st["dialogues"]["rejected_by_reason"]["no_profile"] == 6
        and st["dialogues"]["rejected_by_reason"]["no_partner"] == 2
    )
    assert "dialogues" in s["stages_with_nothing_usable"]
    assert s["teacher"]["requests"] == 1 + 2 + 4  # meta info, 2 annotations, Mira's comment + human-role dialogues
