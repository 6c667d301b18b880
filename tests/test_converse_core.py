"""The pure core of whole-conversation evaluation (no Ray, no model): the template language's scale and metric set,
absolute / pairwise parsing, conversation resume keys, judge requests, and the report's statistics."""

from __future__ import annotations

import pytest
import yaml

from mmrole.data.records import Character, ImageRef
from mmrole.data.templates import load_roleplay_template
from mmrole.eval.contract import JudgeRequest, JudgeResult, build_judge_sample, result_from_reply
from mmrole.eval.converse import (
    Cast,
    Conversation,
    ConverseItem,
    TurnRecord,
    agent_participant,
    conversation_requests,
    pairwise_turn_requests,
    restore,
    turn_requests,
)
from mmrole.eval.converse_report import build_converse_report, repetition_by_turn, write_converse_report
from mmrole.eval.converse_templates import load_partner_template, packaged_template_path
from mmrole.eval.metrics import CONVERSATION_METRICS, METRICS
from mmrole.eval.parse import parse_absolute, try_parse_pairwise
from mmrole.eval.template import JudgeTemplate, JudgeTemplateError
from mmrole.eval.template_loader import load_judge_template


@pytest.mark.parametrize(
    "reply,score",
    [("Good. [Score]: 7", 7.0), ("**Score:** 7/10", 7.0), ("[Score]: 8.5\n", 8.5), ("[score] = 3. Done.", 3.0)],
)
def test_absolute_parser_accepts(reply, score):
    assert parse_absolute(reply) == score


@pytest.mark.parametrize(
    "reply,why",
    [
        ("[Score]: 7, 8", "ambiguous"),
        ("It is a fine reply.", "no score"),
        ("[Score]: 11", "outside"),
        ("[Score]: 0", "outside"),
        ("[Score]: 6 ... on reflection [Score]: 8", "different scores"),
        ("[Scores]: (7, 8)", "no score"),
        ("", "empty"),
    ],
)
def test_absolute_parser_never_guesses(reply, why):
    from mmrole.eval.parse import ScoreParseError

    with pytest.raises(ScoreParseError, match=why):
        parse_absolute(reply)


def test_pairwise_parser_checks_the_scale():
    assert try_parse_pairwise("[Scores]: (3, 9)") == ((3.0, 9.0), None)
    assert try_parse_pairwise("[Scores]: (0, 9)")[0] is None  # below the 1-10 scale


def _template_dict(**kw):
    d = yaml.safe_load(open(packaged_template_path("converse_turn.yaml"), encoding="utf-8"))
    d.update(kw)
    return d


def test_template_scale_and_metric_set_are_checked():
    t = JudgeTemplate.from_dict(_template_dict())
    assert t.scale.kind == "absolute" and (t.scale.min, t.scale.max) == (1, 10) and tuple(t.metrics) == METRICS
    with pytest.raises(JudgeTemplateError, match="no \\{answer_b\\}"):
        JudgeTemplate.from_dict(_template_dict(prompt=_template_dict()["prompt"] + "{answer_b}"))
    with pytest.raises(JudgeTemplateError, match="scale.kind"):
        JudgeTemplate.from_dict(_template_dict(scale={"kind": "stars"}))
    with pytest.raises(JudgeTemplateError, match="metrics missing"):
        JudgeTemplate.from_dict(_template_dict(metric_set="conversation"))
    custom = JudgeTemplate.from_dict(_template_dict(metric_set="custom", metrics={"Wit": "Is {role} witty?"}))
    assert list(custom.metrics) == ["Wit"]
    conv = load_judge_template(packaged_template_path("converse_conversation.yaml"))
    assert tuple(conv.metrics) == CONVERSATION_METRICS
    # The MMRole template keeps its dict (and so its cache keys): no scale / metric_set keys appear.
    assert set(load_judge_template().to_dict()) == {"system", "prompt", "metrics", "roles"}


def test_request_scale_parses_and_must_match_the_template():
    req = JudgeRequest("c#t0", "Fluency", "q", "a", "", "x.png", scale="absolute", scale_min=1, scale_max=10)
    ok = result_from_reply(req, "Fine. [Score]: 6")
    assert ok.ok and ok.score_a == 6 and ok.score_b is None and ok.ratio is None
    bad = result_from_reply(req, "Fine, I think.")
    assert not bad.ok and bad.score_a is None and bad.review == "Fine, I think."
    with pytest.raises(ValueError, match="scale is 'reference'"):
        build_judge_sample(req, load_judge_template())
    pw = JudgeRequest("c#t0", "Fluency", "q", "a", "b", "x.png", swapped=True, scale="pairwise", scale_min=1)
    r = result_from_reply(pw, "[Scores]: (2, 9)")
    assert r.ok and (r.score_a, r.score_b) == (9, 2)  # un-swapped: score_a is the first model's


def test_endpoint_agent_identity_names_the_endpoint():
    from mmrole.eval.cache_keys import agent_identity, digest

    a = {"kind": "openai", "openai": {"base_url": "http://h1/v1", "model": "m"}}
    b = {"kind": "openai", "openai": {"base_url": "http://h2/v1", "model": "m"}}
    assert digest(agent_identity(a, {})) != digest(agent_identity(b, {}))


# ------------------------------------------------------------------------------------------ conversations
NOVA = Character("Nova", "Starfall", "in-distribution", "fictional", "English", "A starship captain.")
QUILL = Character("Quill", "Starfall", "in-distribution", "fictional", "English", "A professor.")
IMAGE = ImageRef("a.png", scene_info="a harbour at dawn")


def _cast(partner_digest="p0"):
    digests = {agent_participant("a"): "da", agent_participant("b"): "db", "partner": partner_digest}
    return Cast({"Nova": NOVA, "Quill": QUILL}, load_roleplay_template(), load_partner_template(), digests)


def _item(partner=None, opening="What do you see?"):
    return ConverseItem("d1", "Nova", partner, IMAGE, opening, "hear a story", "human-role", "in-distribution")


def _grow(cast, conv, texts):
    """Append turns as the run would (keys of this cast)."""
    for text in texts:
        i, sp = len(conv.turns), cast.next_speaker(conv)
        part = agent_participant(conv.model) if sp == "agent" else "partner"
        k = sum(t.speaker == "agent" for t in conv.turns) if sp == "agent" else -1
        name = cast.speaker_name(conv.item, sp)
        src = "opening" if i == 0 and sp == "partner" and conv.item.opening else "generated"
        conv.turns.append(
            TurnRecord("d1", conv.model, i, sp, name, text, "", src, k, cast.expected_key(conv, i, sp, part))
        )
    return conv


def test_restore_reuses_matching_turns_only():
    cast = _cast()
    c = _grow(cast, Conversation(_item(), "a"), ["What do you see?", "Ships.", "Which one?", "The red one."])
    again = Conversation(_item(), "a")
    assert restore(cast, again, c.turns) == 0 and [t.text for t in again.turns] == [t.text for t in c.turns]
    # Another partner model: the opening and the agent's first reply are still valid, its partner turn is not.
    other = Conversation(_item(), "a")
    assert restore(_cast("p1"), other, c.turns) == 2 and len(other.turns) == 2
    # A failed turn ends the conversation there; retry_failed asks it again.
    c.turns[3].error = "endpoint gave up"
    ended = Conversation(_item(), "a")
    restore(cast, ended, c.turns)
    assert "failed" in ended.ended and len(ended.turns) == 4
    retry = Conversation(_item(), "a")
    restore(cast, retry, c.turns, retry_failed=True)
    assert len(retry.turns) == 3 and not retry.ended


def test_partner_prompts_and_judge_requests():
    cast = _cast()
    human = _grow(cast, Conversation(_item(), "a"), ["What do you see?", "Ships at dawn.", "Why dawn?", "Light."])
    s = cast.partner_sample(human, 2)
    assert "hear a story" in s.user_text and "[You]: What do you see?" in s.user_text and "Nova" in s.user_text
    role = _grow(cast, Conversation(_item("Quill", None), "a"), ["Look, ships!", "Indeed, professor-like."])
    assert cast.partner_sample(role, 1).role == "Quill"  # the other character speaks from its own side
    turn_t = load_judge_template(packaged_template_path("converse_turn.yaml"))
    reqs = turn_requests(cast, human, turn_t)
    assert len(reqs) == 2 * 8 and {r.sample_id for r in reqs} == {"d1#t0", "d1#t1"}
    assert "Why dawn?" in next(r for r in reqs if r.sample_id == "d1#t1").question  # the conversation so far
    conv_t = load_judge_template(packaged_template_path("converse_conversation.yaml"))
    creq = conversation_requests(cast, human, conv_t)
    assert len(creq) == 5 and "[Nova]: Light." in creq[0].answer
    for r in reqs[:1] + creq[:1]:
        build_judge_sample(r, turn_t if r in reqs else conv_t)  # renders: scale and placeholders agree
    b = _grow(cast, Conversation(_item(), "b"), ["What do you see?", "Boats.", "Why dawn?", "Sun."])
    pw = pairwise_turn_requests(
        cast, human, b, load_judge_template(packaged_template_path("converse_pairwise_turn.yaml"))
    )
    assert len(pw) == 16 and {r.reference for r in pw} == {"Boats.", "Sun."}
    assert 0 < sum(r.swapped for r in pw) < 16  # a fixed half is shown the other way round
    b.turns[2].text = "Something else"  # different partner words: turn 2 is no longer comparable
    assert {
        r.sample_id
        for r in pairwise_turn_requests(
            cast, human, b, load_judge_template(packaged_template_path("converse_pairwise_turn.yaml"))
        )
    } == {"d1#t0"}


def test_repetition_rate():
    r = repetition_by_turn(["the red ship sails", "the red ship sails home", "a new idea here"], n=3)
    assert r[0] is None and r[1] == pytest.approx(2 / 3) and r[2] == 0.0


def test_report_drift_pairwise_and_outputs(tmp_path):
    cast = _cast()
    texts = ["What do you see?", "Ships.", "Q2", "Boats.", "Q3", "Sails.", "Q4", "Masts."]
    convs = []
    turn_res = {}
    for n in range(4):
        item = ConverseItem(f"d{n}", "Nova", None, IMAGE, "What do you see?", "x", "human-role", "in-distribution")
        c = _grow(cast, Conversation(item, "a"), texts)
        for t in c.turns:
            t.conv = item.id
        convs.append(c)
        for j in range(4):  # scores fall from 9 to 6 over the turns: negative drift
            for m in ("Fluency", "Coherency"):
                turn_res[(f"d{n}#t{j}", m)] = JudgeResult(f"d{n}#t{j}", m, True, score_a=9.0 - j)
    turn_res[("d0#t0", "Tone Consistency")] = JudgeResult("d0#t0", "Tone Consistency", False, error="no score")
    pw = {
        ("a", "b"): {
            "turn": {(f"d{n}#t0", "Fluency"): JudgeResult(f"d{n}#t0", "Fluency", True, 8, 4) for n in range(4)}
        }
    }
    rep = build_converse_report({"a": convs}, {"a": turn_res}, {}, pw, turns=4, bootstrap=100, seed=0)
    m = rep.models[0]
    assert [e.mean for e in m.by_turn] == [9.0, 8.0, 7.0, 6.0]
    assert m.drift.mean == pytest.approx(-3.0) and m.judged["turns"] == {"parsed": 32, "failed": 1}
    assert rep.pairwise[0].wins == 4 and rep.pairwise[0].win_rate.mean == 1.0
    paths = {p.name for p in write_converse_report(rep, tmp_path)}
    assert {"score_by_turn.png", "drift.png", "by_turn.csv", "drift.csv", "converse_report.json"} <= paths
    assert "| a | 4 | 4 |" in (tmp_path / "converse_report.md").read_text()


@pytest.mark.parametrize("name", ["converse.yaml", "converse_tiny_cpu.yaml"])
def test_converse_configs_load(name):
    from pathlib import Path

    from mmrole.config_cli import detect_kind
    from mmrole.eval.converse_config import ConverseJobConfig
    from mmrole.eval.job_config import load_job_config

    path = Path(__file__).parents[1] / "configs" / "eval" / name
    cfg = load_job_config(ConverseJobConfig, path)
    assert cfg.models and cfg.turns >= 1 and cfg.judge is not None
    assert detect_kind(yaml.safe_load(path.read_text())) == "converse"


def test_bad_converse_config_names_the_key():
    from mmrole.config import ConfigError
    from mmrole.eval.converse_config import ConverseJobConfig
    from mmrole.eval.job_config import load_job_config

    base = [
        "data=d",
        "partner.model_path=p",
        "models=[{name: a, agent: {model_path: m}}, {name: b, agent: {model_path: m}}]",
    ]
    with pytest.raises(ConfigError, match="partner_turns=shared"):
        load_job_config(ConverseJobConfig, None, [*base, "partner_turns=live"])
    with pytest.raises(ConfigError, match="judge.kind"):
        load_job_config(ConverseJobConfig, None, [*base, "judge.kind=serve", "judge.serve_url=http://x"])
    with pytest.raises(ConfigError, match="types"):
        load_job_config(ConverseJobConfig, None, [*base, "types=[comment]"])
    with pytest.raises(ConfigError, match="more than once"):
        load_job_config(
            ConverseJobConfig,
            None,
            [
                "data=d",
                "partner.model_path=p",
                "models=[{name: a, agent: {model_path: m}}, {name: a, agent: {model_path: m}}]",
            ],
        )


def test_conversation_view_reads_the_stores(tmp_path):
    from mmrole.eval.converse_view import ConversationNotFound, conversation_view, list_conversations
    from mmrole.eval.store import JsonlStore, ResultsStore

    cast = _cast()
    c = _grow(cast, Conversation(_item(), "a"), ["What do you see?", "Ships.", "Why?", "Dawn."])
    JsonlStore(tmp_path / "conversations" / "a.jsonl").append_records([t.to_dict() for t in c.turns])
    ResultsStore(tmp_path / "judge_results" / "a.turns.jsonl").append(
        [JudgeResult("d1#t1", "Fluency", True, score_a=7.0), JudgeResult("d1#t1", "Coherency", False, error="x")]
    )
    assert list_conversations(tmp_path) == [
        {"model": "a", "conversation": "d1", "agent_turns": 2, "turns": 4, "failed": ""}
    ]
    v = conversation_view(tmp_path, "a", "d1")
    last = v["turns"][-1]
    assert last["text"] == "Dawn." and last["mean"] == 7.0 and last["scores"]["Coherency"]["score"] is None
    with pytest.raises(ConversationNotFound):
        conversation_view(tmp_path, "../a", "d1")


def test_cli_converse_prints_config_and_names_bad_keys(capsys):
    from pathlib import Path

    from mmrole.cli import main

    cfg = str(Path(__file__).parents[1] / "configs" / "eval" / "converse_tiny_cpu.yaml")
    assert main(["eval", "converse", "--config", cfg, "--print-config", "turns=5"]) == 0
    assert "turns: 5" in capsys.readouterr().out
    assert main(["eval", "converse", "--config", cfg, "--print-config", "turnz=5"]) == 2
    assert "turnz" in capsys.readouterr().err


def test_fewer_turns_use_the_first_stored_ones():
    from mmrole.ray_converse import _keep_turns

    cast = _cast()
    c = _grow(cast, Conversation(_item(), "a"), ["What do you see?", "Ships.", "Why?", "Dawn.", "And?", "Gulls."])
    _keep_turns(c, 2)
    assert [t.text for t in c.turns] == ["What do you see?", "Ships.", "Why?", "Dawn."]
    _keep_turns(c, 5)  # more than stored: nothing dropped (the run extends it)
    assert len(c.turns) == 4
