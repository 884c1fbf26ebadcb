"""A scripted judge: an HTTP server on 127.0.0.1 that speaks OpenAI's chat-completions protocol.

Used by tests/test_judge.py (in a thread, port 0) and for a demo of the judge without a real model:

    python tests/judge_server.py --port 8011          # then, in another shell:
    JUDGE_BASE_URL=http://127.0.0.1:8011/v1 JUDGE_MODEL=scripted JUDGE_API_KEY=x RUN_NAME=demo-judge make demo

It reads the <question>, <reference>, <answer_a> and <answer_b> blocks of job/prompts/judge.md's user message
and answers as its script says:

- overlap      prefers the answer that shares more words with the doctor's reply (tie when equal), whatever
               its position: a consistent judge (winner 4 on every criterion, loser 2, a tie 3 and 3)
- always-a     says "A" every time (winner 4, loser 2): a judge with pure position bias
- malformed    prose with no JSON in it
- flaky        answers 500 to the first FAIL_FIRST requests (Retry-After-Ms: 1), then as overlap
- reject-key   answers 401 to everything, quoting the key like OpenAI's API does
- down         answers 503 to everything
- rate-limited answers 429 to everything (Retry-After-Ms: 1)
- no-quota     answers 429 insufficient_quota to everything, as OpenAI's API does for an account out of credit
- slow         waits DELAY seconds (default 0.3), then answers as overlap: a judge to stop halfway
- no-choices   answers 200 with a JSON object that has no 'choices' (an endpoint that is not chat completions)
- html         answers 200 with a web page (a wrong URL, a proxy's login page)
- echo-key     answers as overlap, quoting the request's API key in the verdict's reason and around it

A request for a model other than MODEL gets OpenAI's 404 "model_not_found".
"""

from __future__ import annotations

import argparse
import html
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCRIPTS = (
    "overlap",
    "always-a",
    "malformed",
    "flaky",
    "reject-key",
    "down",
    "rate-limited",
    "no-quota",
    "slow",
    "no-choices",
    "html",
    "echo-key",
)
_BLOCK = re.compile(r"<(question|reference|answer_a|answer_b)>\n?(.*?)\n?</\1>", re.DOTALL)
_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _verdict(preference: str, reason: str) -> dict:
    high, low, even = 4, 2, 3
    a = {"tie": even, "A": high, "B": low}[preference]
    b = {"tie": even, "A": low, "B": high}[preference]
    crit = ("accuracy", "safety", "completeness", "clarity")
    return {"reason": reason, "A": dict.fromkeys(crit, a), "B": dict.fromkeys(crit, b), "preference": preference}


def blocks(user_message: str) -> dict[str, str]:
    """The tagged texts of the user message, unescaped (job/judge.py escapes &, < and > in each)."""
    return {tag: html.unescape(text) for tag, text in _BLOCK.findall(user_message)}


def overlap_verdict(user_message: str) -> dict:
    blocks_ = blocks(user_message)
    ref = _words(blocks_.get("reference", ""))
    a, b = len(ref & _words(blocks_.get("answer_a", ""))), len(ref & _words(blocks_.get("answer_b", "")))
    preference = "A" if a > b else "B" if b > a else "tie"
    return _verdict(preference, f"A shares {a} words with the reference, B {b}.")


class JudgeServer(ThreadingHTTPServer):
    """server = JudgeServer("overlap"); server.start(); ... server.base_url ...; server.stop().

    `requests` records every request received: {"path", "authorization", "body"}.
    """

    daemon_threads = True

    def __init__(
        self, script: str = "overlap", port: int = 0, model: str = "scripted", fail_first: int = 1, delay: float = 0.3
    ):
        if script not in SCRIPTS:
            raise ValueError(f"script must be one of {SCRIPTS}")
        super().__init__(("127.0.0.1", port), _Handler)
        self.script, self.model, self.fail_first, self.delay = script, model, fail_first, delay
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> JudgeServer:
        # A short poll so stop() (shutdown) returns at once; the default 0.5 s adds up over many tests.
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: JudgeServer

    def log_message(self, format, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str, headers: dict | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}, headers)

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        auth = self.headers.get("Authorization", "")
        s = self.server
        with s.lock:
            s.requests.append({"path": self.path, "authorization": auth, "body": body})
            n = len(s.requests)
        if not self.path.endswith("/chat/completions"):
            return self._error(404, f"no route {self.path}", "not_found")
        if s.script == "reject-key":
            key = auth.removeprefix("Bearer ")
            return self._error(401, f"Incorrect API key provided: {key}.", "invalid_api_key")
        if s.script == "down":
            return self._error(503, "The server is overloaded or not ready yet.", "unavailable")
        if s.script == "rate-limited":
            return self._error(429, "Rate limit reached, please retry.", "rate_limit_exceeded", {"Retry-After-Ms": "1"})
        if s.script == "no-quota":
            return self._error(429, "You exceeded your current quota.", "insufficient_quota", {"Retry-After-Ms": "1"})
        if s.script == "flaky" and n <= s.fail_first:
            return self._error(500, "Internal error, please retry.", "server_error", {"Retry-After-Ms": "1"})
        if body.get("model") != s.model:
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "model_not_found")
        if s.script == "html":
            page = b"<!DOCTYPE html><html><head><title>Welcome</title></head><body><h1>It works!</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return None
        if s.script == "no-choices":
            return self._send(200, {"id": f"x-{n}", "object": "chat.completion", "model": s.model, "result": "ok"})
        if s.script == "slow":
            time.sleep(s.delay)
        user = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        if s.script == "malformed":
            content = "Answer A is kinder, but B is more thorough; I would pick one of them."
        elif s.script == "always-a":
            content = "Here is my verdict: " + json.dumps(_verdict("A", "A is better."))
        elif s.script == "echo-key":
            key = auth.removeprefix("Bearer ")
            verdict = overlap_verdict(user) | {"reason": f"Checked with key {key}."}
            content = f"(request signed with {key})\n" + json.dumps(verdict)
        else:  # overlap, and flaky once it works; in a code fence, as chat models often write it
            content = "```json\n" + json.dumps(overlap_verdict(user), indent=1) + "\n```"
        prompt_chars = sum(len(m.get("content", "")) for m in body.get("messages", []))
        usage = {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content) // 4}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._send(
            200,
            {
                "id": f"chatcmpl-scripted-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": s.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": usage,
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="A scripted judge speaking OpenAI's chat-completions protocol.")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--script", choices=SCRIPTS, default="overlap")
    parser.add_argument("--model", default="scripted", help="the model name it serves (others get 404)")
    parser.add_argument("--fail-first", type=int, default=1, help="flaky: requests answered 500 first")
    parser.add_argument("--delay", type=float, default=0.3, help="slow: seconds before each answer")
    args = parser.parse_args()
    server = JudgeServer(args.script, args.port, args.model, args.fail_first, args.delay)
    print(f"scripted judge ({args.script}) serving model {args.model!r} at {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
