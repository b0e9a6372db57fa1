"""A fault-injecting OpenAI-compatible /v1/chat/completions server on 127.0.0.1, for testing the `openai` judge.

The fake judge prefers the option whose text contains `GOOD` (P = 0.9 for that letter, via
top_logprobs); with neither or both it answers "A" at 0.6 (a position bias, like small judges). Asked
anything that is not a judge question, the fake model refuses what contains `HARM` and complies otherwise.

Faults, each applied to one request (see FAULTS for what the client sees):
  "429"        HTTP 429 with Retry-After: `retry_after` seconds
  "500"/"503"  HTTP 500 / 503
  "400"        HTTP 400 (not retryable)
  "slow"       a normal reply, but only after `slow_s` seconds (beyond the client's timeout)
  "trickle"    a normal reply sent one byte every `trickle_s` seconds (no single read times out)
  "drop"       headers and half the body, then the connection is closed
  "reset"      the connection is closed before any response
  "truncated"  200 with a JSON body cut in half (content-length matches the cut body)
  "empty"      200 with an empty body
  "html"       200 with an HTML error page
  "wrongshape" 200 with JSON that is not a chat completion ({"choices": "oops"})
  "nologprobs" a normal reply without logprobs (valid: the client reads the letter from the text)
  "garbage"    200 with text "Maybe?" and no usable logprobs
  "badletter"  200 with text "C" and top_logprobs over C and D only
  "nanlogprob" 200 with text "Maybe?" and top_logprobs A: NaN, B: Infinity
  "echokey"    HTTP 500 whose body echoes the request's Authorization header (a leaky proxy)
  "echokeytext" a valid answer whose text goes on to quote the request's Authorization header
  None         a normal reply

Which requests get which fault:
- `faults`: a list consumed one per request (in arrival order); then `always` for every later request.
- `flaky=(kinds, max_failures)`: every distinct prompt fails its first n attempts, n in 0..max_failures
  drawn from a hash of (seed, prompt), the fault of each attempt cycling through `kinds`. Deterministic
  whatever the client's concurrency, so a run against it can be compared with a clean run.
`injected` counts the faults served. The server runs in daemon threads, answers requests concurrently,
and shuts itself down after `max_lifetime` seconds even if a test forgets to stop it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Faults the client must survive by retrying (transient) and must fail cleanly on (persistent).
RETRYABLE = ["429", "500", "503", "slow", "trickle", "drop", "reset", "truncated", "empty", "html", "wrongshape",
             "garbage", "badletter", "nanlogprob", "echokey"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that gave up (timeout) is expected here
        pass


class FakeOpenAI:
    def __init__(self, faults: list | None = None, always: str | None = None, flaky: tuple | None = None,
                 seed: int = 0, retry_after: float = 0.05, slow_s: float = 3.0, trickle_s: float = 0.1,
                 max_lifetime: float = 120.0, port: int = 0):
        self.faults = list(faults or [])
        self.always = always
        self.flaky, self.seed = flaky, seed
        self.retry_after, self.slow_s, self.trickle_s = retry_after, slow_s, trickle_s
        self.requests: list[dict] = []  # every request: {"path", "headers", "body", "fault"}
        self.injected: Counter = Counter()  # fault -> times served
        self.attempts: Counter = Counter()  # prompt -> requests seen
        self.lock = threading.Lock()
        self.max_lifetime, self.port = max_lifetime, port
        self._server: ThreadingHTTPServer | None = None

    def _fault_for(self, text: str):
        """The fault of the next request for `text` (called under the lock)."""
        if self.faults:
            return self.faults.pop(0)
        if self.flaky is not None:
            kinds, max_failures = self.flaky
            h = int(hashlib.sha256(f"{self.seed}/{text}".encode()).hexdigest()[:8], 16)
            n = h % (max_failures + 1)
            attempt = self.attempts[text]
            if attempt < n:
                return kinds[(h + attempt) % len(kinds)]
            return None
        return self.always

    # -- lifecycle
    def __enter__(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like real endpoints: a dropped connection is visible

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                text = ""
                if self.path.endswith("/chat/completions"):
                    text = body["messages"][-1]["content"]
                with fake.lock:
                    fault = fake._fault_for(text)
                    fake.attempts[text] += 1
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "fault": fault})
                    if fault is not None:
                        fake.injected[fault] += 1
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": "not found"})
                if fault in ("429", "500", "503", "400"):
                    hdr = {"Retry-After": str(fake.retry_after)} if fault == "429" else None
                    return self._send(int(fault), {"error": f"fault {fault}"}, hdr)
                if fault == "echokey":
                    return self._send(500, {"error": f"upstream refused {self.headers.get('Authorization')}"})
                if fault == "reset":
                    self.close_connection = True
                    return
                if fault == "empty":
                    return self._raw(200, b"")
                if fault == "html":
                    return self._raw(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                if fault == "wrongshape":
                    return self._send(200, {"choices": "oops"})
                reply = fake.reply(text, body, logprobs=fault != "nologprobs", fault=fault,
                                   auth=self.headers.get("Authorization"))
                data = json.dumps(reply).encode()
                if fault == "slow":
                    time.sleep(fake.slow_s)
                    return self._raw(200, data)
                if fault == "truncated":
                    return self._raw(200, data[: len(data) // 2])
                if fault == "drop":  # promise the whole body, send half, hang up
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if fault == "trickle":
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(fake.trickle_s)
                    return
                return self._raw(200, data)

            def _send(self, status, obj, headers=None):
                self._raw(status, json.dumps(obj).encode(), headers=headers)

            def _raw(self, status, data: bytes, ctype="application/json", headers=None):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = _Server(("127.0.0.1", self.port), Handler)
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
        m = re.search(r"\(A\) (.*?)\n\n\(B\) (.*?)\n\n(?:Answer|Think)", text, flags=re.S)
        a_good, b_good = (("GOOD" in m.group(1)), ("GOOD" in m.group(2))) if m else (False, False)
        if a_good and not b_good:
            return 0.9
        if b_good and not a_good:
            return 0.1
        return 0.6

    @staticmethod
    def answer(text: str) -> str:
        """What the fake model answers to a request that is no judge question (a refusal decision is asked)."""
        return "I'm sorry, but I can't help with that." if "HARM" in text else "Sure: here is how."

    def reply(self, text: str, body: dict, logprobs: bool, fault: str | None = None, auth: str | None = None) -> dict:
        if "(A) " not in text:  # not a judge question: the model answers the prompt itself
            msg = {"role": "assistant", "content": self.answer(text)}
            return {"id": "fake", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": msg, "finish_reason": "length"}]}
        p = self.preference(text)
        letter = "A" if p >= 0.5 else "B"
        top = [{"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]
        content = letter
        if fault == "garbage":
            content, logprobs = "Maybe?", False
        elif fault == "badletter":
            content, top = "C", [{"token": "C", "logprob": math.log(0.7)}, {"token": "D", "logprob": math.log(0.3)}]
        elif fault == "echokeytext":
            content = f"{letter} (request signed {auth})"
        elif fault == "nanlogprob":
            content, top = "Maybe?", [{"token": "A", "logprob": float("nan")}, {"token": "B", "logprob": float("inf")}]
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if logprobs and body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": content, "logprob": top[0]["logprob"], "top_logprobs": top}]}
        return {"id": "fake", "object": "chat.completion", "model": body.get("model"), "choices": [choice]}
