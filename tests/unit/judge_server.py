"""A deterministic OpenAI-compatible judge on 127.0.0.1 for the win-rate tests (a real HTTP server in a thread).

Rule "longer": the longer answer wins, equal lengths tie. Rule "first": always [[A]] (a fully position-biased judge).
An answer containing GARBAGE gets a 200 whose body is not JSON; one containing NOVERDICT gets a reply without a
verdict tag. The first ``fail_first`` requests get a 500 (with Retry-After-Ms: 1 so the client's retry is quick).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


class FakeJudge:
    def __init__(self, rule: str = "longer", fail_first: int = 0, max_requests: int = 200):
        self.rule, self.fail_first, self.max_requests = rule, fail_first, max_requests
        self.requests = 0
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def verdict(self, a: str, b: str) -> str:
        if "NOVERDICT" in a + b:
            return "Both answers have merits; I cannot decide."
        if self.rule == "first":
            return "Assistant A is better. [[A]]"
        if len(a) == len(b):
            return "Equally good. [[C]]"
        return "Explanation mentions [[A]] and [[B]]. Final verdict: " + ("[[A]]" if len(a) > len(b) else "[[B]]")

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests += 1
                    n = judge.requests
                if n > judge.max_requests:  # a runaway client would hang the test otherwise
                    return self._send(400, b'{"error": {"message": "request budget exceeded"}}')
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "not found"}}')
                if n <= judge.fail_first:
                    return self._send(500, b'{"error": {"message": "overloaded"}}', {"Retry-After-Ms": "1"})
                user = body["messages"][-1]["content"]
                with judge.lock:
                    judge.prompts.append(user)
                answers = dict(_ANSWER.findall(user))
                if "GARBAGE" in answers["A"] + answers["B"]:
                    return self._send(200, b"{not json")
                reply = judge.verdict(answers["A"], answers["B"])
                out = {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                self._send(200, json.dumps(out).encode())

        return Handler
