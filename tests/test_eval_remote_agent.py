"""Answering with an OpenAI-compatible endpoint: bounded concurrency, retries on 429/5xx, fatal 401/404 naming the
URL, timeouts recorded per sample; and against our own Serve agent on CPU (real Ray Serve, tiny model)."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from mmrole.eval.judges import JudgeConfigError
from mmrole.eval.remote_agent import OpenAIAgent, OpenAIAgentConfig
from mmrole.models import GenerationParams

REPO = Path(__file__).resolve().parents[1]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


class ScriptedServer:
    """Answers by script: a list of statuses per question (then 200), an optional delay; records concurrency."""

    def __init__(self, statuses=None, delay_s=0.0, status_all=None):
        self.statuses = statuses or {}
        self.status_all = status_all
        self.delay_s = delay_s
        self.calls: dict[str, int] = {}
        self.active = self.peak = 0
        self.bodies = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][1]["content"][1]["text"]
                with fake.lock:
                    n = fake.calls[question] = fake.calls.get(question, 0) + 1
                    fake.active += 1
                    fake.peak = max(fake.peak, fake.active)
                    fake.bodies.append((self.headers.get("Authorization"), body))
                try:
                    time.sleep(fake.delay_s)
                    script = fake.statuses.get(question, [])
                    status = fake.status_all or (script[n - 1] if n <= len(script) else 200)
                    if status == 200:
                        content = f"answer to {question}"
                        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                    else:
                        data = json.dumps({"error": {"message": f"status {status}"}})
                    raw = data.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
                    pass
                finally:
                    with fake.lock:
                        fake.active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _agent(url, **kw):
    cfg = OpenAIAgentConfig(
        model="m", base_url=url, api_key_env="MMROLE_TEST_AGENT_KEY", backoff_initial_s=0.01, backoff_max_s=0.05, **kw
    )
    return OpenAIAgent(cfg, GenerationParams(max_new_tokens=16, seed=3))


def test_remote_agent_retries_bounds_concurrency_and_records_failures(monkeypatch):
    monkeypatch.setenv("MMROLE_TEST_AGENT_KEY", "sk-test")
    server = ScriptedServer(statuses={"q1": [429, 503], "q2": [500] * 10, "q3": [400]}, delay_s=0.05)
    try:
        agent = _agent(server.url, max_concurrency=2, max_http_retries=3)
        items = [("sys", f"q{i}", _png(), f"{i}.png") for i in range(6)] + [("sys", "bad", b"not an image", "x.png")]
        out = agent.answer(items)
    finally:
        server.close()
    assert out[0] == ("answer to q0", "")
    assert out[1] == ("answer to q1", "") and server.calls["q1"] == 3  # 429, 503, then 200
    assert out[2][0] == "" and "gave up after 4 HTTP tries" in out[2][1] and server.url in out[2][1]
    assert out[3][0] == "" and "HTTP 400" in out[3][1] and server.calls["q3"] == 1  # not retried
    assert out[6][0] == "" and out[6][1].startswith("image:") and "bad" not in server.calls
    assert server.peak <= 2  # bounded concurrency
    auth, body = server.bodies[0]
    assert auth == "Bearer sk-test" and body["model"] == "m" and body["max_tokens"] == 16 and body["seed"] == 3
    assert body["messages"][0] == {"role": "system", "content": "sys"}
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_remote_agent_fatal_status_and_timeouts_name_the_url(monkeypatch):
    monkeypatch.delenv("MMROLE_TEST_AGENT_KEY", raising=False)
    with pytest.raises(JudgeConfigError, match="MMROLE_TEST_AGENT_KEY"):
        _agent("http://127.0.0.1:9/v1")
    monkeypatch.setenv("MMROLE_TEST_AGENT_KEY", "wrong")
    server = ScriptedServer(status_all=401)
    try:
        with pytest.raises(JudgeConfigError, match=r"127\.0\.0\.1.*HTTP 401"):
            _agent(server.url).answer([("s", "q", _png(), "1.png")])
    finally:
        server.close()
    slow = ScriptedServer(delay_s=1.0)
    try:
        (answer, error), *_ = _agent(slow.url, timeout_s=0.2, max_http_retries=1).answer([("s", "q", _png(), "1.png")])
    finally:
        slow.close()
    assert answer == "" and "timeout" in error and slow.url in error


@pytest.mark.ray
@pytest.mark.slow
def test_generate_job_with_our_serve_agent_as_openai_endpoint(serve_stack, demo_prepared, tmp_path):
    """jobs' answering through Ray Data with agent.kind=openai against our own Serve agent (the session's Serve
    stack, tiny model, CPU): every sample is answered or recorded as failed, and a rerun with nothing changed does
    nothing."""
    from mmrole.data.prepared import iter_samples
    from mmrole.eval.job_config import GenerateJobConfig, load_job_config
    from mmrole.ray_eval import run_generate

    url = serve_stack["agent"] + "/v1"
    out = tmp_path / "eval"
    overrides = [
        "model_name=served-agent",
        "agent.kind=openai",
        "agent.openai.model=mmrole-agent",
        f"agent.openai.base_url={url}",
        "agent.openai.api_key_env=null",
        "agent.openai.require_api_key=false",
        "agent.openai.max_concurrency=4",
        f"data={demo_prepared}",
        f"out={out}",
        "max_samples=6",
        "generation.max_new_tokens=6",
        "pool.concurrency=[1]",
        "pool.num_cpus=0.25",
        "pool.batch_size=3",
        "progress=false",
    ]
    cfg = load_job_config(GenerateJobConfig, None, overrides)
    summary = run_generate(cfg)
    assert summary["samples"] == 6 == summary["answered"] + summary["failed"]
    assert summary["failed"] == 0, summary["failures"]
    ids = [s.id for s in iter_samples(demo_prepared, "test")][:6]
    written = {}
    for f in out.glob("*-test_answers/served-agent/*_test.json"):
        written.update({r["id"]: r["conversations"][1]["answer"] for r in json.loads(f.read_text())})
    assert sorted(written) == sorted(ids) and all(isinstance(a, str) for a in written.values())
    t0 = time.perf_counter()
    again = run_generate(cfg)
    assert again["answered_now"] == 0 and time.perf_counter() - t0 < 30
