"""A real OpenAI-compatible chat-completions server on loopback, scripted by a Python callable, so the
judge backend is tested over real HTTP (timeouts, status codes, concurrency) rather than with mocks.

    with FakeOpenAI(sensible()) as server:
        OpenAIChatBackend(server.base_url, "judge")...

`respond(request_json, call_number)` returns a `Reply`; `call_number` counts earlier requests with the
same messages (0 on the first), so a script can fail a given chat k times and then answer. The server
records every request body and its headers, and the most requests it ever had in flight at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass
class Reply:
    content: str | None = None  # the assistant's message, wrapped in a chat-completions body
    status: int = 200
    body: str | None = None  # sent verbatim instead (garbage JSON, error payloads)
    delay_s: float = 0.0


Respond = Callable[[dict, int], Reply]


class FakeOpenAI:
    def __init__(self, respond: Respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self._calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.block_on_close = False  # a reply sleeping for a client that left needn't hold a test
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _arrive(self, request: dict, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests.append(request)
            self.headers.append(headers)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            key = json.dumps(request.get("messages"), sort_keys=True)
            self._calls[key] += 1
            return self._calls[key] - 1

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _handler(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            call_number = server._arrive(request, {k.lower(): v for k, v in self.headers.items()})
            try:
                if self.path != "/v1/chat/completions":
                    reply = Reply(status=404, body='{"error": {"message": "no such route"}}')
                else:
                    reply = server.respond(request, call_number)
                time.sleep(reply.delay_s)
                body = (
                    reply.body
                    if reply.body is not None
                    else json.dumps(
                        {
                            "object": "chat.completion",
                            "model": request.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": reply.content},
                                    "finish_reason": "stop",
                                }
                            ],
                        }
                    )
                )
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left
            finally:
                server._leave()

        def log_message(self, *args) -> None:
            pass

    return Handler


# ---------------------------------------------------------------- scripted judges

SECTION = re.compile(
    r"\[The Start of Assistant ([AB])'s \w+\]\n(.*?)\n\[The End of Assistant \1's \w+\]", re.DOTALL
)


def shown_answers(request: dict) -> dict[str, str]:
    """{"A": ..., "B": ...}: the two answers an MT-Bench-style user message shows the judge."""
    return dict(SECTION.findall(request["messages"][-1]["content"]))


def sensible(keyword: str = "great") -> Respond:
    """Prefers the answer containing `keyword`; a tie when both or neither do."""

    def respond(request: dict, call_number: int) -> Reply:
        has = {name: keyword in text for name, text in shown_answers(request).items()}
        verdict = "C" if has["A"] == has["B"] else ("A" if has["A"] else "B")
        return Reply(f"Comparing the two, my verdict: [[{verdict}]]")

    return respond


def position_biased(request: dict, call_number: int) -> Reply:
    return Reply("Assistant A is better. [[A]]")


def garbage(request: dict, call_number: int) -> Reply:
    return Reply("Both continuations have their merits; I cannot decide.")


def garbage_then_valid(judge: Respond) -> Respond:
    """Unparseable at first; `judge`'s answer once the client re-asks with a seed >= 1."""
    return lambda request, n: judge(request, n) if request.get("seed", 0) >= 1 else garbage(request, n)


def flaky(judge: Respond, failures: int, statuses: tuple[int, ...] = (500, 503, 429)) -> Respond:
    """The first `failures` calls of each chat fail with `statuses` in turn, then `judge` answers."""

    def respond(request: dict, call_number: int) -> Reply:
        if call_number < failures:
            status = statuses[call_number % len(statuses)]
            return Reply(status=status, body=json.dumps({"error": {"message": f"scripted {status}"}}))
        return judge(request, call_number)

    return respond


def slow(judge: Respond, delay_s: float, calls: int = 1) -> Respond:
    """`judge`, delayed by `delay_s` on the first `calls` calls of each chat (`calls=-1`: on every call)."""

    def respond(request: dict, call_number: int) -> Reply:
        reply = judge(request, call_number)
        if calls < 0 or call_number < calls:
            reply.delay_s = delay_s
        return reply

    return respond


def failing(status: int, message: str = "scripted failure") -> Respond:
    return lambda request, n: Reply(status=status, body=json.dumps({"error": {"message": message}}))
