"""The OpenAI-compatible judge against a fake chat-completions server on 127.0.0.1: images as data: URLs,
bounded concurrency, retries with backoff on 429/5xx (Retry-After honoured), timeouts, bad replies, fatal auth."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmrole.eval.contract import expand_requests
from mmrole.eval.formats import AnswerRecord
from mmrole.eval.judges import JudgeConfigError
from mmrole.eval.metrics import METRICS
from mmrole.eval.openai_judge import OpenAIJudge, OpenAIJudgeConfig


class FakeOpenAI:
    """A threaded fake of POST /v1/chat/completions. ``behave(body, key, n)`` -> (status, headers, payload, delay),
    where key = (sample marker, metric) parsed from the prompt and n = how often that key was asked before."""

    def __init__(self, behave):
        self.behave = behave
        self.lock = threading.Lock()
        self.calls: dict = {}
        self.bodies: list = []
        self.auth: set = set()
        self.inflight = 0
        self.max_inflight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][1]["content"][1]["text"]
                sid = text.split("QUESTION-")[1].split("\n")[0].strip()
                metric = next(m for m in METRICS if f"\n{m}: " in text)
                key = (sid, metric)
                with fake.lock:
                    n = fake.calls.get(key, 0)
                    fake.calls[key] = n + 1
                    fake.bodies.append(body)
                    fake.auth.add(self.headers.get("Authorization"))
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    status, headers, payload, delay = fake.behave(body, key, n)
                    time.sleep(delay)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    with fake.lock:
                        fake.inflight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def reply(text):
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


OK = lambda body, key, n: (200, {}, reply(f"Fine. [Scores]: ({7 + n % 3}, 8)"), 0.0)  # noqa: E731


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "COCO").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16 + i, 12), (i * 40, 10, 200)).save(root / "COCO" / f"{i}.png")
    return root


def _answers(n=2):
    return [
        AnswerRecord(
            id=f"s{i}",
            question=f"Talk about it.\nQUESTION-s{i}\n",
            reference=f"truth {i}",
            answer=f"answer {i}",
            image=f"COCO/{i % 3}.png",
            role="Iron Man",
            other_role="a curious human",
            set_name="in-test",
            dialogue_type="comment",
        )
        for i in range(n)
    ]


def _cfg(url, images, **kw):
    base = dict(
        model="judge-x",
        base_url=url,
        api_key_env="MMROLE_TEST_JUDGE_KEY",
        images_root=str(images),
        max_concurrency=4,
        timeout_s=5.0,
        max_http_retries=3,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        max_retries=2,
    )
    base.update(kw)
    return OpenAIJudgeConfig(**base)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("MMROLE_TEST_JUDGE_KEY", "sk-test-123")


def test_scores_with_image_data_url_and_bounded_concurrency(images):
    def slow_ok(body, key, n):
        return 200, {}, reply("[Scores]: (6, 8)"), 0.05

    reqs = expand_requests(_answers(3))
    with FakeOpenAI(slow_ok) as srv:
        judge = OpenAIJudge(_cfg(srv.url, images, max_concurrency=3))
        results = judge.score_batch(reqs)
    assert [r.key for r in results] == [r.key for r in reqs]
    assert all(r.ok and r.ratio == 0.75 and r.attempts == 1 for r in results)
    assert srv.calls == {r.key: 1 for r in reqs}  # one judge call per (sample, metric)
    assert 1 < srv.max_inflight <= 3
    assert srv.auth == {"Bearer sk-test-123"}
    body = srv.bodies[0]
    assert body["model"] == "judge-x" and body["temperature"] == 0.0
    assert body["messages"][0]["role"] == "system"
    url = next(b for b in srv.bodies if "QUESTION-s1" in b["messages"][1]["content"][1]["text"])["messages"][1][
        "content"
    ][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (images / "COCO" / "1.png").read_bytes()
    text = body["messages"][1]["content"][1]["text"]
    assert "Model A" in text and "[Scores]" in text


def test_retries_on_429_and_500_honouring_retry_after(images):
    def flaky(body, key, n):
        if key[0] == "s0" and n == 0:
            return 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}, 0.0
        if key[0] == "s1" and n < 2:
            return 500 if n == 0 else 503, {}, "upstream error", 0.0
        return OK(body, key, 0)

    reqs = [r for r in expand_requests(_answers(2)) if r.metric == "Fluency"]
    with FakeOpenAI(flaky) as srv:
        judge = OpenAIJudge(_cfg(srv.url, images))
        t0 = time.perf_counter()
        results = judge.score_batch(reqs)
        elapsed = time.perf_counter() - t0
    assert all(r.ok for r in results)
    assert srv.calls == {("s0", "Fluency"): 2, ("s1", "Fluency"): 3}
    assert elapsed >= 0.95  # waited for Retry-After: 1 although the backoff is 0.01 s


def test_gives_up_after_http_retries_as_a_recorded_failure(images):
    def always_500(body, key, n):
        return (500, {}, "boom", 0.0) if key[1] == "Fluency" else OK(body, key, 0)

    reqs = expand_requests(_answers(1))
    with FakeOpenAI(always_500) as srv:
        results = OpenAIJudge(_cfg(srv.url, images, max_http_retries=2)).score_batch(reqs)
    bad = [r for r in results if not r.ok]
    assert [r.metric for r in bad] == ["Fluency"]
    assert "gave up after 3 HTTP tries" in bad[0].error and "HTTP 500" in bad[0].error
    assert bad[0].score_a is None and bad[0].ratio is None  # never a zero
    assert srv.calls[("s0", "Fluency")] == 3
    assert sum(r.ok for r in results) == 7


def test_timeouts_are_retried(images):
    def slow_first(body, key, n):
        return 200, {}, reply("[Scores]: (8, 8)"), (1.0 if n == 0 or key[0] == "s1" else 0.0)

    reqs = [r for r in expand_requests(_answers(2)) if r.metric == "Coherency"]
    with FakeOpenAI(slow_first) as srv:
        results = OpenAIJudge(_cfg(srv.url, images, timeout_s=0.25, max_http_retries=1)).score_batch(reqs)
    assert results[0].ok and srv.calls[("s0", "Coherency")] == 2
    assert not results[1].ok and "timeout" in results[1].error


def test_unparsable_replies_are_reasked_with_sampling_then_recorded(images):
    def bad(body, key, n):
        if key[1] == "Fluency":  # never parses
            return 200, {}, reply("I refuse to give numbers."), 0.0
        if key[1] == "Coherency" and n == 0:  # parses on the re-ask
            return 200, {}, reply("Scores are great!"), 0.0
        if key[1] == "Tone Consistency":  # parses, but B = 0: recorded failure, not re-asked
            return 200, {}, reply("[Scores]: (5, 0)"), 0.0
        if key[1] == "Fluency" or key[1] == "Response Accuracy":
            return 200, {}, {"unexpected": "shape"}, 0.0
        return OK(body, key, 0)

    reqs = expand_requests(_answers(1))
    with FakeOpenAI(bad) as srv:
        judge = OpenAIJudge(_cfg(srv.url, images, max_retries=2, max_http_retries=1))
        res = {r.metric: r for r in judge.score_batch(reqs)}
    flu = res["Fluency"]
    assert not flu.ok and flu.attempts == 3 and flu.review == "I refuse to give numbers."
    assert flu.error.startswith("unparsable after 3 replies")
    temps = [b["temperature"] for b in srv.bodies if "\nFluency: " in b["messages"][1]["content"][1]["text"]]
    seeds = [b["seed"] for b in srv.bodies if "\nFluency: " in b["messages"][1]["content"][1]["text"]]
    assert temps == [0.0, 0.7, 0.7] and seeds == [0, 1, 2]
    assert res["Coherency"].ok and res["Coherency"].attempts == 2
    tone = res["Tone Consistency"]
    assert not tone.ok and "is 0" in tone.error and srv.calls[("s0", "Tone Consistency")] == 1
    ra = res["Response Accuracy"]  # a 200 with a malformed body is retried at HTTP level, then recorded
    assert not ra.ok and "malformed response body" in ra.error
    assert res["Fluency"].ratio is None and sum(r.ok for r in res.values()) == 5


def test_auth_errors_stop_the_run_and_missing_key_is_caught_early(images, monkeypatch):
    def deny(body, key, n):
        return 401, {}, {"error": {"message": "bad key"}}, 0.0

    with FakeOpenAI(deny) as srv:
        with pytest.raises(JudgeConfigError, match="HTTP 401"):
            OpenAIJudge(_cfg(srv.url, images)).score_batch(expand_requests(_answers(1)))
    monkeypatch.delenv("MMROLE_TEST_JUDGE_KEY")
    with pytest.raises(JudgeConfigError, match="MMROLE_TEST_JUDGE_KEY"):
        OpenAIJudge(_cfg("http://127.0.0.1:9/v1", images))
    # a keyless server (vLLM) is fine, and no Authorization header is sent
    with FakeOpenAI(OK) as srv:
        j = OpenAIJudge(_cfg(srv.url, images, api_key_env=None, require_api_key=False))
        assert all(r.ok for r in j.score_batch(expand_requests(_answers(1), ["Fluency"])))
    assert srv.auth == {None}


def test_bad_images_and_other_4xx_fail_only_their_requests(images):
    def reject_s1(body, key, n):
        return (400, {}, {"error": "image too large"}, 0.0) if key[0] == "s1" else OK(body, key, 0)

    answers = _answers(3)
    answers[2].image = "COCO/missing.png"
    reqs = [r for r in expand_requests(answers) if r.metric == "Fluency"]
    with FakeOpenAI(reject_s1) as srv:
        res = OpenAIJudge(_cfg(srv.url, images)).score_batch(reqs)
    assert res[0].ok
    assert not res[1].ok and "HTTP 400" in res[1].error and srv.calls[("s1", "Fluency")] == 1
    assert not res[2].ok and res[2].error.startswith("image:") and ("s2", "Fluency") not in srv.calls


def test_usable_from_inside_an_event_loop(images):
    import asyncio

    async def main(judge, reqs):
        return judge.score_batch(reqs)  # sync call from a running loop: runs on a helper thread

    with FakeOpenAI(OK) as srv:
        judge = OpenAIJudge(_cfg(srv.url, images))
        res = asyncio.run(main(judge, expand_requests(_answers(1), ["Fluency"])))
    assert res[0].ok
