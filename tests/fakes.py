"""Local fake provider servers that speak the real wire protocol, on 127.0.0.1 only.

Behaviour is scripted per prompt text: a list of responses to give before answering
normally, each a status code (with optional Retry-After) or "malformed"/"slow".
Every request is counted per prompt, so duplicates and losses are visible.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    status: int | str
    retry_after: float | None = None
    body: dict[str, Any] | None = None


@dataclass
class FakeState:
    latency: float = 0.0
    script: dict[str, list[Scripted]] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)


def _last_text(messages: list[dict[str, Any]]) -> str:
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")


class _OpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeState

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("content-length", 0))
        payload = json.loads(self.rfile.read(length))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
        text = _last_text(payload["messages"])
        state = self.state
        with state.lock:
            state.calls[text] += 1
            state.requests.append(payload)
            state.auth_headers.append(self.headers.get("authorization", ""))
            state.times[text].append(time.monotonic())
            pending = state.script.get(text)
            step = pending.pop(0) if pending else None
        if state.latency:
            time.sleep(state.latency)
        if step is not None:
            if step.status == "malformed":
                return self._send(200, b"{not json")
            if step.status == "slow":
                time.sleep(step.retry_after or 5)
            else:
                headers = {"retry-after": str(step.retry_after)} if step.retry_after is not None else {}
                body = step.body or {"error": {"message": f"fake error {step.status}", "type": "fake", "code": None}}
                return self._send(int(step.status), body, headers)
        words = len(text.split())
        self._send(
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": payload["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": f"answer to: {text}"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": words, "completion_tokens": words + 2, "total_tokens": 2 * words + 2},
            },
        )


class FakeOpenAI:
    """A threaded OpenAI-compatible server; use as a context manager."""

    def __init__(self) -> None:
        self.state = FakeState()
        handler = type("Handler", (_OpenAIHandler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
