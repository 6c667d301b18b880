"""A small local OpenAI-compatible teacher for the datagen tests: canned, well-formed replies keyed on the prompt.

Names in the prompt switch on the reject paths: "Malformed" (no JSON), "Refuse" (a refusal), "Slow" (sleeps past
the client's timeout), "Disclaimer" (an assistant-style disclaimer in the dialogue), "Confused" (an inter-role turn
labelled with the other speaker), "Wrongtongue" (English text for a Chinese character), "Echo" (the same dialogue
for every image: near-duplicates). ``fail_first_429`` answers 429 to the first request of each annotation prompt;
``api_key`` answers 401 to any other key; ``no_schema`` answers 400 to a ``response_format``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from PIL import Image

from mmrole.cli import main as mmrole_main

WORDS = (
    "harbour lantern maple copper violin orchard pebble thunder meadow saffron glacier compass velvet ember "
    "quarry ribbon falcon marble lagoon thistle canyon bramble cobalt willow parchment beacon tundra orchid "
    "sparrow granite cinder juniper hollow prairie tide mirror anchor clover drizzle summit kettle puzzle"
).split()
HANZI = "山水风月花鸟云雨江湖春秋夜雪松竹梅兰诗酒茶剑琴书画灯桥舟城楼草木石海天星光影心梦"


def sentence(rng: random.Random, zh: bool, n: int = 14) -> str:
    if zh:
        return "".join(rng.choice(HANZI) for _ in range(n)) + "。"
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _user_text(body: dict) -> tuple[str, str]:
    """(text of the last user message, the image data URL or '')."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content, ""
    text = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    url = "".join(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
    return text, url


def canned_reply(text: str, image_url: str) -> str:
    """The reply content for a prompt (JSON text, or the fault the prompt's names ask for)."""
    lang = re.search(r"Write (?:the dialogue )?in (\w+)", text)
    zh = bool(lang and lang.group(1) == "Chinese")
    seed = int(hashlib.sha256((text + image_url).encode()).hexdigest()[:8], 16)
    rng = random.Random(seed)
    if "Malformed" in text:
        return "Sure! Here is what you asked for: {name: broken, 'turns': ["
    if "Refuse" in text:
        return "I'm sorry, but I can't help with that request."
    if "Task: rate" in text:
        metrics = re.search(r"from 1 \(poor\) to 10 \(excellent\): (.*?)\. Answer", text, re.DOTALL).group(1)
        score = 3 if "Dull" in text else 8
        scores = {m.strip(): score for m in metrics.replace("\n", " ").split(",")}
        return json.dumps({"scores": scores, "reason": "canned"})
    if "Task: invent the basic facts" in text:
        name = re.search(r"Name: (.*)", text).group(1).strip()
        return json.dumps(
            {
                "name": name,
                "gender": "Female",
                "age": "34",
                "origin": "Lisbon" if not zh else "杭州",
                "personality": sentence(rng, zh, 8),
                "experience": sentence(rng, zh, 16),
            },
            ensure_ascii=False,
        )
    if "Task: summarise" in text or "Task: expand" in text:
        return json.dumps(
            {
                "introduction": sentence(rng, zh, 16),
                "personality": sentence(rng, zh, 16),
                "life_story": sentence(rng, zh, 16),
                "relationships": sentence(rng, zh, 12),
                "catchphrases": [sentence(rng, zh, 5), sentence(rng, zh, 4)],
            },
            ensure_ascii=False,
        )
    if "Task: annotate" in text:
        return (
            "```json\n"
            + json.dumps({"role_info": "", "place_info": "A quiet studio", "scene_info": sentence(rng, False, 10)})
            + "\n```"
        )
    m = re.search(r'Use "(.+?)" and "(.+?)" as speakers', text)
    if not m:
        return "I do not know this task."
    a, b = m.group(1), m.group(2)
    if "Echo" in text:
        rng = random.Random(7)  # the same dialogue whatever the image
    n = 2 if "comment dialogue" in text else 4
    turns = []
    for i in range(n):
        speaker = a if i % 2 == 0 else b
        body = sentence(rng, zh and speaker != "human", 10)
        if "Wrongtongue" in text:
            body = sentence(rng, False, 14)
        turns.append({"speaker": speaker, "text": body})
    if "Disclaimer" in text:
        turns[-1]["text"] = "As an AI language model, I do not have personal feelings about pictures."
    if "Confused" in text and "inter-role" in text:
        turns[1]["text"] = f"{a}: " + turns[1]["text"]
    # A little prose around the JSON: the tolerant parser must cope.
    return "Here is the dialogue:\n" + json.dumps({"turns": turns}, ensure_ascii=False) + "\nHope this helps"


class CannedTeacher:
    """``with CannedTeacher() as t: t.url`` -> http://127.0.0.1:PORT/v1; ``t.hits`` counts HTTP requests."""

    def __init__(
        self, api_key: str | None = None, fail_first_429: bool = False, no_schema: bool = False, slow_s=3.0, delay_s=0.0
    ):
        self.api_key, self.fail_first_429, self.no_schema, self.slow_s = api_key, fail_first_429, no_schema, slow_s
        self.delay_s = delay_s
        self.hits = 0
        self.inflight = 0
        self.max_inflight = 0
        self.bodies: list[dict] = []
        self.seen_429: set = set()
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with teacher.lock:
                    teacher.hits += 1
                    teacher.bodies.append(body)
                    teacher.inflight += 1
                    teacher.max_inflight = max(teacher.max_inflight, teacher.inflight)
                try:
                    self._answer(body)
                finally:
                    with teacher.lock:
                        teacher.inflight -= 1

            def _answer(self, body: dict):
                if teacher.api_key is not None and self.headers.get("Authorization") != f"Bearer {teacher.api_key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if teacher.no_schema and "response_format" in body:
                    return self._send(400, {"error": {"message": "response_format is not supported"}})
                text, url = _user_text(body)
                if "Slow" in text:
                    time.sleep(teacher.slow_s)
                if teacher.fail_first_429 and "Task: annotate" in text:
                    key = hashlib.sha256(url.encode()).hexdigest()
                    with teacher.lock:
                        first = key not in teacher.seen_429
                        teacher.seen_429.add(key)
                    if first:
                        return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                time.sleep(teacher.delay_s)  # so concurrent requests overlap
                content = canned_reply(text, url)
                self._send(
                    200,
                    {
                        "choices": [{"message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": len(text) // 4 + 1, "completion_tokens": len(content) // 4 + 1},
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ---- helpers shared by the datagen tests


def make_images(folder: Path, n: int = 6, corrupt: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64 + 8 * i, 48), ((40 * i) % 255, 120, 200 - 20 * i))
        im.save(folder / f"img_{i:02d}.png")
    if corrupt:
        (folder / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def write_characters(path: Path, chars: list) -> Path:
    path.write_text(yaml.safe_dump({"characters": chars}, allow_unicode=True), encoding="utf-8")
    return path


def teacher_args(url: str, *extra: str) -> list[str]:
    return [
        f"teacher.base_url={url}",
        "teacher.model=canned",
        "teacher.api_key_env=null",
        "teacher.require_api_key=false",
        "teacher.max_concurrency=4",
        "teacher.backoff_initial_s=0.01",
        "teacher.timeout_s=60",  # a retry after a timeout under load would overlap its own request (5 in flight)
        *extra,
    ]


def generate(tmp_path, chars, url, *extra, out="gen") -> tuple[int, Path]:
    root = tmp_path / out
    rc = mmrole_main(
        [
            "data",
            "generate",
            "--characters",
            str(write_characters(tmp_path / f"{out}_chars.yaml", chars)),
            "--images",
            str(tmp_path / "pics"),
            "--out",
            str(root),
            *teacher_args(url, *extra),
        ]
    )
    return rc, root


def rejects(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
