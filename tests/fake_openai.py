"""A tiny OpenAI-compatible /v1/chat/completions server on 127.0.0.1 for testing the `openai` judge.

The fake judge prefers the option whose text contains `GOOD` (P = 0.9 for that letter, via
top_logprobs); with neither or both it answers "A" at 0.6 (a position bias, like small judges).
Faults are scripted: `server.faults` is a list consumed one per request, each one of
  "429"        -> HTTP 429 with Retry-After: 0.05
  "500"        -> HTTP 500
  "nologprobs" -> a normal reply without logprobs (the client must parse the letter from the text)
  "garbage"    -> 200 with text "Maybe?" and no usable logprobs (never a valid label)
  None         -> a normal reply
`always` applies one fault to every request once the list is empty. The server runs in a daemon
thread, answers each request without blocking, and shuts itself down after `max_lifetime` seconds
even if a test forgets to stop it.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, faults: list | None = None, always: str | None = None, max_lifetime: float = 60.0):
        self.faults = list(faults or [])
        self.always = always
        self.requests: list[dict] = []  # every request: {"path", "headers", "body"}
        self.lock = threading.Lock()
        self.max_lifetime = max_lifetime
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle
    def __enter__(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fault = fake.faults.pop(0) if fake.faults else fake.always
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": "not found"})
                if fault == "429":
                    return self._send(429, {"error": "rate limited"}, {"Retry-After": "0.05"})
                if fault == "500":
                    return self._send(500, {"error": "boom"})
                text = body["messages"][-1]["content"]
                return self._send(200, fake.reply(text, body, logprobs=fault is None, garbage=fault == "garbage"))

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.max_lifetime, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- the fake judge
    @staticmethod
    def preference(text: str) -> float:
        """P(first option) the fake judge gives a filled judge template."""
        m = re.search(r"\(A\) (.*?)\n\n\(B\) (.*?)\n\nQuestion:", text, flags=re.S)
        a_good, b_good = (("GOOD" in m.group(1)), ("GOOD" in m.group(2))) if m else (False, False)
        if a_good and not b_good:
            return 0.9
        if b_good and not a_good:
            return 0.1
        return 0.6

    def reply(self, text: str, body: dict, logprobs: bool, garbage: bool) -> dict:
        p = self.preference(text)
        letter = "A" if p >= 0.5 else "B"
        content = "Maybe?" if garbage else letter
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if logprobs and body.get("logprobs"):
            top = [{"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]
            choice["logprobs"] = {"content": [{"token": letter, "logprob": math.log(max(p, 1 - p)), "top_logprobs": top}]}
        return {"id": "fake", "object": "chat.completion", "model": body.get("model"), "choices": [choice]}
