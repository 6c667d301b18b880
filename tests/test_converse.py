"""``mmrole eval converse`` end to end on the demo test split with tiny models on CPU (Ray Data, the session's Ray):
N turns stored per conversation, resume after a stop redoes no finished turn, per-turn and whole-conversation
scores (absolute and pairwise) from an OpenAI-compatible judge, the report with the drift plot; and our Serve agent
as the OpenAI-compatible partner."""

from __future__ import annotations

import json

import pytest
from fake_chat_server import FakeChatServer, text_hash

from mmrole.eval.converse_config import ConverseJobConfig
from mmrole.eval.job_config import load_job_config


class ConverseJudgeServer(FakeChatServer):
    """An OpenAI-compatible judge on 127.0.0.1: the score is a hash of the prompt (deterministic), ``[Score]: n``
    when the prompt asks for one score, ``[Scores]: (a, b)`` when it asks for two; every 6th prompt (by hash) gets a
    reply without a score, which must be recorded as a failure, never a score."""

    def __init__(self):
        def reply(body: dict) -> str:
            text = body["messages"][-1]["content"][-1]["text"]
            h = text_hash(text)
            if h % 6 == 0:
                return "Both replies have merits; I cannot decide."
            if text.rstrip().endswith("[Score]: (a number from 1 to 10)"):
                return f"Assessment. [Score]: {1 + h % 10}"
            return f"Comparison. [Scores]: ({1 + h % 10}, {1 + (h // 10) % 10})"

        super().__init__(reply)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _cfg(demo_prepared, out, agent, *extra):
    return load_job_config(
        ConverseJobConfig,
        None,
        [
            f"data={demo_prepared}",
            f"out={out}",
            f"partner.model_path={agent}",
            "turns=2",
            "max_items=2",  # one human-role item (the test dialogue's opening first) and one inter-role (agent opens)
            "generation.max_new_tokens=5",
            "generation.min_new_tokens=3",
            "partner_generation.max_new_tokens=5",
            "partner_generation.min_new_tokens=3",
            "pool.num_cpus=0.5",
            "pool.batch_size=8",
            "judge_pool.num_cpus=0.5",
            "judge_pool.batch_size=32",
            "bootstrap=50",
            "progress=false",
            *extra,
        ],
    )


@pytest.mark.ray
@pytest.mark.slow
def test_converse_resumes_scores_and_reports(ray_local, tiny_models, demo_prepared, tmp_path):
    from mmrole.eval.store import ResultsStore
    from mmrole.ray_converse import run_converse
    from mmrole.ray_converse_judging import run_converse_scoring, write_converse_outputs

    agent = tiny_models["agent"]
    judge = ConverseJudgeServer()
    out = tmp_path / "conv"
    models = f"models=[{{name: a, agent: {{model_path: {agent}}}}}, {{name: b, agent: {{model_path: {agent}, max_length: 3000}}}}]"
    judge_args = [
        "judge.kind=openai",
        "judge.openai.model=fake",
        f"judge.openai.base_url={judge.url}",
        "judge.openai.api_key_env=null",
        "judge.openai.require_api_key=false",
        "judge.openai.max_retries=0",
    ]
    cfg = _cfg(demo_prepared, out, agent, models, *judge_args)
    try:
        first = run_converse(cfg, stop_after=1)  # stops after the first turn pipeline
        assert first["stopped"]
        store = {m: out / "converse" / "conversations" / f"{m}.jsonl" for m in ("a", "b")}
        before = {m: store[m].read_bytes() for m in store}
        n_before = {m: len(_lines(store[m])) for m in store}
        assert all(n >= 1 for n in n_before.values())

        done = run_converse(cfg)
        for m in ("a", "b"):
            s = done["models"][m]
            assert s["conversations"] == 2 and s["complete"] == 2, s
            assert s["turns_reused"] == n_before[m] and s["turns_new"] == s["turns_stored"] - n_before[m]
            assert store[m].read_bytes().startswith(before[m])  # appended only: no finished turn redone
            recs = _lines(store[m])
            keys = [(r["conv"], r["index"]) for r in recs]
            assert len(keys) == len(set(keys))  # every turn stored once
            by_conv = {}
            for r in recs:
                by_conv.setdefault(r["conv"], []).append(r)
            assert len(by_conv) == 2
            for turns in by_conv.values():
                assert sum(r["speaker"] == "agent" for r in turns) == 2  # N agent turns per conversation
                assert all(not r["error"] for r in turns)
            opened = [t for t in by_conv.values() if t[0]["source"] == "opening"]
            assert len(opened) == 1 and len(opened[0]) == 4  # opening, agent, partner, agent
        # Shared partner turns: b answers the very words a's partner said.
        pa = {(r["conv"], r["index"]): r["text"] for r in _lines(store["a"]) if r["speaker"] == "partner"}
        pb = {(r["conv"], r["index"]): r for r in _lines(store["b"]) if r["speaker"] == "partner"}
        assert pa and set(pa) == set(pb) and all(pb[k]["text"] == pa[k] for k in pa)
        assert {r["source"] for r in pb.values()} <= {"opening", "replay:a"}
        again = run_converse(cfg)
        assert again["generated_now"] == 0

        scored = run_converse_scoring(cfg)
        stores = scored["stores"]
        assert stores["a.turns"]["requests"] == 2 * 2 * 8 and stores["a.conversation"]["requests"] == 2 * 5
        pair_turn = sum(v["requests"] for k, v in stores.items() if k.startswith("pairwise/a__b.turns"))
        assert pair_turn == 2 * 2 * 8
        assert all(v["missing"] == 0 for v in stores.values())
        failed = sum(v["failed"] for v in stores.values())
        assert 0 < failed < sum(v["requests"] for v in stores.values())
        res = ResultsStore(out / "converse" / "judge_results" / "a.turns.jsonl").load()
        assert all(r.ok == (r.score_a is not None) for r in res.values())
        assert all(1 <= r.score_a <= 10 and r.score_b is None for r in res.values() if r.ok)
        assert all(r.error and r.review for r in res.values() if not r.ok)  # a failure keeps the raw reply
        assert run_converse_scoring(cfg)["scored_now"] == 0

        rep, paths = write_converse_outputs(cfg)
        names = {p.name for p in paths}
        assert {"score_by_turn.png", "drift.png", "by_turn.csv", "pairwise.csv", "converse_report.md"} <= names
        d = json.loads((out / "converse" / "report" / "converse_report.json").read_text())
        a = next(m for m in d["models"] if m["model"] == "a")
        assert len(a["by_turn"]) == 2 and a["by_turn"][0]["n"] >= 1
        assert a["judged"]["turns"]["parsed"] + a["judged"]["turns"]["failed"] == 32
        levels = {p["level"] for p in d["pairwise"]}
        assert levels == {"turn", "conversation"}
        assert all(0 <= p["win_rate"]["mean"] <= 1 for p in d["pairwise"] if p["win_rate"]["mean"] is not None)
        assert "## Score by turn index" in (out / "converse" / "report" / "converse_report.md").read_text()
    finally:
        judge.close()


@pytest.mark.ray
@pytest.mark.slow
def test_converse_with_our_serve_agent_as_partner(serve_stack, tiny_models, demo_prepared):
    """The partner (a simulated human) is our Serve agent behind its OpenAI-compatible endpoint; the judge app's
    page then opens the stored conversation with its per-turn scores."""
    import httpx

    from mmrole.ray_converse import run_converse
    from mmrole.ray_converse_judging import run_converse_scoring

    judge = ConverseJudgeServer()
    out = serve_stack["converse_out"]  # the Serve judge app's converse_dir is <out>/converse
    cfg = _cfg(
        demo_prepared,
        out,
        tiny_models["agent"],
        # A second model behind an endpoint that refuses connections: its first turn fails and ends its
        # conversation there (recorded, counted), while the first model's goes on.
        f"models=[{{name: local, agent: {{model_path: {tiny_models['agent']}}}}}, {{name: unreachable, agent: "
        "{kind: openai, openai: {model: x, base_url: 'http://127.0.0.1:9/v1', api_key_env: null, "
        "require_api_key: false, max_http_retries: 0}}}]",
        "partner.kind=openai",
        "partner.model_path=",
        "partner.openai.model=mmrole-agent",
        f"partner.openai.base_url={serve_stack['agent']}/v1",
        "partner.openai.api_key_env=null",
        "partner.openai.require_api_key=false",
        "max_items=1",
        "types=[human-role]",
        "judge.kind=openai",
        "judge.openai.model=fake",
        f"judge.openai.base_url={judge.url}",
        "judge.openai.api_key_env=null",
        "judge.openai.require_api_key=false",
        "judge.openai.max_retries=0",
    )
    try:
        summary = run_converse(cfg)["models"]
        s, broken = summary["local"], summary["unreachable"]
        assert broken["ended_early"] == 1 and broken["complete"] == 0 and broken["turns_stored"] == 2
        failed = _lines(out / "converse" / "conversations" / "unreachable.jsonl")[-1]
        assert failed["speaker"] == "agent" and "127.0.0.1:9" in failed["error"] and failed["text"] == ""
        recs = _lines(out / "converse" / "conversations" / "local.jsonl")
        assert s["conversations"] == 1 and s["turns_stored"] == len(recs)
        partner = [r for r in recs if r["speaker"] == "partner" and r["source"] == "generated"]
        assert len(partner) == 1 and partner[0]["text"].strip()  # the Serve agent spoke between the agent's turns
        assert s["complete"] == 1 and [r["speaker"] for r in recs] == ["partner", "agent", "partner", "agent"]
        run_converse_scoring(cfg)
    finally:
        judge.close()
    headers = {"Authorization": f"Bearer {serve_stack['token']}"}
    listing = httpx.get(serve_stack["judge"] + "/v1/conversations", headers=headers, timeout=30).json()["data"]
    assert [(c["model"], c["agent_turns"], bool(c["failed"])) for c in listing] == [
        ("local", 2, False),
        ("unreachable", 0, True),
    ]
    conv = listing[0]["conversation"]
    view = httpx.get(
        serve_stack["judge"] + "/v1/conversation", params={"model": "local", "id": conv}, headers=headers, timeout=30
    ).json()
    agent = [t for t in view["turns"] if t["speaker"] == "agent"]
    assert [t["text"] for t in view["turns"]] == [r["text"] for r in recs]
    assert len(agent) == 2 and all(len(t["scores"]) == 8 for t in agent)  # every metric: a score or a failure
    assert all((v["score"] is None) != v["ok"] for t in agent for v in t["scores"].values())
    assert len(view["conversation_scores"]) == 5
    missing = httpx.get(
        serve_stack["judge"] + "/v1/conversation", params={"model": "nobody", "id": conv}, headers=headers, timeout=30
    )
    assert missing.status_code == 404 and "nobody" in missing.json()["error"]["message"]


@pytest.mark.ray
@pytest.mark.slow
def test_judge_page_shows_a_stored_conversation_in_chromium(serve_stack, tmp_path):
    """The judge page (headless Chromium) lists the conversation stored by the test above and shows its turns with
    their per-turn scores. Skips without chromium/chromedriver/selenium (fails under CI, as tests/test_serve.py)."""
    import os
    import shutil
    from pathlib import Path

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        webdriver = None
    if not (chromium and driver_bin and webdriver):
        msg = "chromium, chromedriver or selenium missing: run scripts/install_browser.sh, pip install selenium"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    if not list((serve_stack["converse_out"] / "converse" / "conversations").glob("*.jsonl")):
        pytest.skip("no stored conversation: run with test_converse_with_our_serve_agent_as_partner")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1360,1400",
        f"--user-data-dir={tmp_path}",
    ):
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_bin))
    try:
        drv.set_page_load_timeout(60)
        drv.get(serve_stack["judge"] + "/")
        wait = WebDriverWait(drv, 60, poll_frequency=0.2)
        wait.until(lambda d: d.find_element("id", "token-box").is_displayed())
        drv.find_element("id", "token").send_keys(serve_stack["token"])
        drv.find_element("id", "token-save").click()
        wait.until(lambda d: len(d.find_elements("css selector", "#conv-log .msg")) == 4)
        assert drv.find_element("id", "conv-panel").is_displayed()
        whos = [e.text for e in drv.find_elements("css selector", "#conv-log .msg .who")]
        assert sum("turn" in w and "score" in w for w in whos) == 2, whos  # the agent's two turns, with scores
        assert len(drv.find_elements("css selector", "#conv-log details .metric")) == 2 * 8
        assert drv.find_element("id", "conv-error").text == ""
        artifacts = Path(os.environ.get("MMROLE_TEST_ARTIFACTS", Path(__file__).parents[1] / "tmp" / "artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(artifacts / "judge_conversation.png"))
    finally:
        drv.quit()
