"""An OpenAI-compatible ``/chat/completions`` fake on 127.0.0.1 for the judging tests: the HTTP plumbing once, the
reply chosen by the test (``reply(body) -> content``, called on the server's threads)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def text_hash(text: str) -> int:
    """A deterministic integer of a text (replies that depend only on the request)."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


class FakeChatServer:
    """Answers every POST with one chat completion whose content is ``reply(request body)``; counts the calls."""

    def __init__(self, reply: Callable[[dict], str]):
        self.calls = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.calls += 1
                content = reply(body)
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
