"""A local fake LLM server on 127.0.0.1 that speaks each provider's wire protocol:
OpenAI chat completions (also Azure's deployment paths and TGI's Messages API),
Anthropic messages, Gemini/Vertex generateContent, Ollama chat/generate, and prompto's
Quart server (`POST /generate`).

A request that asks for reasoning is answered as a reasoning model answers, in each API's
own shape: Anthropic `thinking` blocks with a signature and `output_tokens_details`, Gemini
parts with `thought: true` and `thoughtsTokenCount`, OpenAI's
`completion_tokens_details.reasoning_tokens` (and vLLM's `reasoning_content` when
`reasoning_text` is set), Ollama's `thinking`.

Behaviour is scripted per prompt text: a list of steps to play before answering
normally, each a status code (with optional Retry-After and body) or "malformed" /
"slow". Every request is counted per prompt, so duplicates and losses are visible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from promptfleet.core.schemas import example_instance


@dataclass
class Scripted:
    status: int | str
    retry_after: float | None = None
    body: Any = None


@dataclass
class Seen:
    protocol: str
    path: str
    headers: dict[str, str]
    payload: dict[str, Any]


@dataclass
class FakeState:
    latency: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # sent with every response
    limit: int | None = None  # requests allowed per `window` seconds; more get 429 + Retry-After
    window: float = 1.0
    limit_headers: bool = False  # also send OpenAI-style x-ratelimit-* headers
    accepted: list[float] = field(default_factory=list)
    rejected: int = 0
    script: dict[str, list[Scripted]] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)  # 200 answers per prompt: an answer paid twice shows here
    seen: list[Seen] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # Gemini File API, by name
    uploads: list[bytes] = field(default_factory=list)  # bytes received by the upload endpoint
    pending_uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    processing_polls: int = 0  # GETs an uploaded file answers PROCESSING before ACTIVE
    schema_replies: list[str] = field(default_factory=list)  # raw answers to play first when JSON is asked for
    reasoning_text: bool = False  # OpenAI-compatible answers carry `reasoning_content`, as vLLM and DeepSeek send it

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [s.payload for s in self.seen]

    @property
    def auth_headers(self) -> list[str]:
        return [s.headers.get("authorization", "") for s in self.seen]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and "text" in p)


# Each protocol: how to find the prompt text, a success body, an error body.
def _openai_text(p: dict) -> str:
    return _text(p["messages"][-1]["content"])


REASONING_TOKENS = 7  # what every fake reasoning answer spent thinking


def thought_about(text: str) -> str:
    return f"thinking about: {text}"


def _openai_ok(p: dict, answer: str, n: int, reasoning_text: bool = False) -> dict:
    thinks = "reasoning_effort" in p
    r = REASONING_TOKENS if thinks else 0
    message = {"role": "assistant", "content": answer}
    if reasoning_text and thinks:
        message["reasoning_content"] = thought_about(_openai_text(p))
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
        "model": f"{p.get('model', 'tgi')}-2026-01-01", "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": n, "completion_tokens": n + 2 + r, "total_tokens": 2 * n + 2 + r,
                  **({"completion_tokens_details": {"reasoning_tokens": r}} if thinks else {})},
    }  # fmt: skip


def _openai_err(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "fake_error", "code": None}}


def _anthropic_text(p: dict) -> str:
    return _text(p["messages"][-1]["content"])


def _anthropic_ok(p: dict, answer: str, n: int, reasoning_text: bool = False) -> dict:
    thinks = (p.get("thinking") or {}).get("type") == "enabled"
    content = [{"type": "text", "text": answer}]
    usage: dict = {"input_tokens": n, "output_tokens": n + 2}
    if thinks:
        content.insert(0, {"type": "thinking", "thinking": thought_about(_anthropic_text(p)), "signature": "EqQBCgIYAhIM-fake-signature"})
        usage = {"input_tokens": n, "output_tokens": n + 2 + REASONING_TOKENS, "output_tokens_details": {"thinking_tokens": REASONING_TOKENS}}
    return {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": f"{p['model']}-20260101",
        "content": content, "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
    }  # fmt: skip


def _anthropic_err(status: int, message: str) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _gemini_text(p: dict) -> str:
    return _text(p["contents"][-1]["parts"])


def _gemini_ok(p: dict, answer: str, n: int, reasoning_text: bool = False) -> dict:
    thinking = (p.get("generationConfig") or {}).get("thinkingConfig") or {}
    spelt = lambda name: thinking.get(name, thinking.get(re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name)))  # noqa: E731 - proto JSON takes both spellings, the SDK sends snake_case here
    r = REASONING_TOKENS if thinking and spelt("thinkingBudget") != 0 else 0
    parts: list = [{"text": answer}]
    if r and spelt("includeThoughts"):
        parts.insert(0, {"text": thought_about(_gemini_text(p)), "thought": True})
    usage = {"promptTokenCount": n, "candidatesTokenCount": n + 2, "totalTokenCount": 2 * n + 2 + r, **({"thoughtsTokenCount": r} if r else {})}
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": usage, "modelVersion": "fake-model-001", "responseId": "resp_fake",
    }


def _gemini_err(status: int, message: str) -> dict:
    name = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
            429: "RESOURCE_EXHAUSTED"}.get(status, "INTERNAL")  # fmt: skip
    return {"error": {"code": status, "message": message, "status": name}}


def _ollama_text(p: dict) -> str:
    return p["messages"][-1]["content"] if "messages" in p else p["prompt"]


def _ollama_ok(p: dict, answer: str, n: int, reasoning_text: bool = False) -> dict:
    body = {"model": p["model"], "created_at": "2026-01-01T00:00:00Z", "done": True, "done_reason": "stop",
            "prompt_eval_count": n, "eval_count": n + 2}  # fmt: skip
    thought = {"thinking": thought_about(_ollama_text(p))} if p.get("think") else {}
    if "messages" in p:
        body["message"] = {"role": "assistant", "content": answer, **thought}
    else:
        body.update(response=answer, **thought)
    return body


def _ollama_err(status: int, message: str) -> dict:
    return {"error": message}


def _quart_text(p: dict) -> str:
    """prompto's server takes `text`: the prompt, or chat messages for the model's template."""
    text = p["text"]
    return text if isinstance(text, str) else text[-1]["content"]


def _quart_ok(p: dict, answer: str, n: int, reasoning_text: bool = False) -> dict:
    return {"response": [{"generated_text": answer}], "model": "fake-org/quart-model"}


def _quart_err(status: int, message: str) -> bytes:
    return f"<!doctype html>\n<title>{status}</title>\n<h1>Error</h1>\n<p>{message}</p>\n".encode()  # Quart's HTML error page


def asked_schema(protocol: str, p: dict) -> dict | None:
    """The JSON Schema a request asks the answer to follow, in each API's own place."""
    if protocol == "openai":
        return ((p.get("response_format") or {}).get("json_schema") or {}).get("schema")
    if protocol == "anthropic":
        return ((p.get("output_config") or {}).get("format") or {}).get("schema")
    if protocol == "gemini":
        config = p.get("generationConfig") or {}
        return config.get("responseJsonSchema") if config.get("responseMimeType") == "application/json" else None
    return p.get("format") if isinstance(p.get("format"), dict) else None


PROTOCOLS = {
    "openai": (_openai_text, _openai_ok, _openai_err),
    "anthropic": (_anthropic_text, _anthropic_ok, _anthropic_err),
    "gemini": (_gemini_text, _gemini_ok, _gemini_err),
    "ollama": (_ollama_text, _ollama_ok, _ollama_err),
    "quart": (_quart_text, _quart_ok, _quart_err),
}


def protocol_of(path: str) -> str | None:
    path = path.split("?")[0]
    if path.endswith("/chat/completions"):
        return "openai"
    if path.endswith("/v1/messages"):
        return "anthropic"
    if re.search(r"/models/[^/]+:generateContent$", path):
        return "gemini"
    if path in ("/api/chat", "/api/generate"):
        return "ollama"
    if path.endswith("/generate"):
        return "quart"
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeState

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for key, value in {**self.state.headers, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        state = self.state
        if path == "/":  # prompto's quart server answers its ping
            return self._send(200, b"pong")
        with state.lock:
            if re.fullmatch(r"/v1(?:beta)?/files", path):
                return self._send(200, {"files": list(state.files.values())})
            if (m := re.fullmatch(r"/v1(?:beta)?/(files/[^/]+)", path)) and m.group(1) in state.files:
                file = state.files[m.group(1)]
                if file["state"] == "PROCESSING":
                    file["_polls"] = file.get("_polls", 0) + 1
                    if file["_polls"] > state.processing_polls:
                        file["state"] = "ACTIVE"
                return self._send(200, {k: v for k, v in file.items() if not k.startswith("_")})
        self._send(404, {"error": {"code": 404, "message": f"no route {self.path}", "status": "NOT_FOUND"}})

    def do_DELETE(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        with self.state.lock:
            if (m := re.fullmatch(r"/v1(?:beta)?/(files/[^/]+)", path)) and self.state.files.pop(m.group(1), None):
                return self._send(200, {})
        self._send(404, {"error": {"code": 404, "message": "no such file", "status": "NOT_FOUND"}})

    def _file_upload(self, body: bytes) -> None:
        """The File API's resumable upload: a start request, then the bytes with finalize."""
        state = self.state
        command = self.headers.get("x-goog-upload-command", "")
        with state.lock:
            if command == "start":
                upload_id = str(len(state.pending_uploads) + len(state.uploads))
                meta = json.loads(body or b"{}").get("file", {})
                meta.setdefault("mimeType", self.headers.get("x-goog-upload-header-content-type"))
                state.pending_uploads[upload_id] = meta
                host = self.headers.get("host")
                return self._send(200, {}, {"x-goog-upload-url": f"http://{host}/upload/v1beta/files?upload_id={upload_id}"})
            upload_id = self.path.split("upload_id=")[-1]
            meta = state.pending_uploads.pop(upload_id)
            state.uploads.append(body)
            name = f"files/fake{len(state.uploads)}"
            digest = base64.b64encode(hashlib.sha256(body).hexdigest().encode()).decode()
            file = {"name": name, "displayName": meta.get("displayName", meta.get("display_name")), "mimeType": meta.get("mimeType"),
                    "sizeBytes": str(len(body)), "sha256Hash": digest, "uri": f"http://{self.headers.get('host')}/v1beta/{name}",
                    "state": "PROCESSING" if state.processing_polls else "ACTIVE"}  # fmt: skip
            state.files[name] = file
        self._send(200, {"file": file}, {"x-goog-upload-status": "final"})

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path.startswith(("/upload/v1beta/files", "/upload/v1/files")):
            return self._file_upload(body)
        payload = json.loads(body)
        protocol = protocol_of(self.path)
        if protocol is None:
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        text_of, ok, error = PROTOCOLS[protocol]
        text = text_of(payload)
        state = self.state
        with state.lock:
            state.calls[text] += 1
            state.seen.append(Seen(protocol, self.path, {k.lower(): v for k, v in self.headers.items()}, payload))
            state.times[text].append(time.monotonic())
            pending = state.script.get(text)
            step = pending.pop(0) if pending else None
            limit_headers, over = self._enforce_limit(state)
        if over is not None:
            body = error(429, "rate limit exceeded")
            return self._send(429, body, {"retry-after": f"{over:.3f}", **limit_headers})
        if state.latency:
            time.sleep(state.latency)
        if step is not None:
            if step.status == "malformed":
                return self._send(200, b"{not json")
            if step.status == "slow":
                time.sleep(step.retry_after or 5)
            else:
                headers = {"retry-after": str(step.retry_after)} if step.retry_after is not None else {}
                body = step.body if step.body is not None else error(int(step.status), f"fake error {step.status}")
                return self._send(int(step.status), body, headers)
        answer = f"answer to: {text}"
        if (schema := asked_schema(protocol, payload)) is not None:
            with state.lock:
                played = state.schema_replies.pop(0) if state.schema_replies else None
            answer = played if played is not None else json.dumps(example_instance(schema, text))
        request_id = {"x-request-id": f"req_fake_{len(state.seen)}", "request-id": f"req_fake_{len(state.seen)}"}
        with state.lock:
            state.answered[text] += 1
        self._send(200, ok(payload, answer, len(text.split()), state.reasoning_text), {**limit_headers, **request_id})

    @staticmethod
    def _enforce_limit(state: FakeState) -> tuple[dict[str, str], float | None]:
        """A sliding-window request limit, as providers enforce it (called under the lock)."""
        if state.limit is None:
            return {}, None
        now = time.monotonic()
        recent = [t for t in state.accepted if t > now - state.window]
        over = None
        if len(recent) >= state.limit:
            state.rejected += 1
            over = recent[0] + state.window - now
        else:
            state.accepted.append(now)
            recent.append(now)
        headers = {}
        if state.limit_headers:
            reset = (recent[0] + state.window - now) if recent else 0.0
            headers = {
                "x-ratelimit-limit-requests": str(int(state.limit * 60 / state.window)),
                "x-ratelimit-remaining-requests": str(max(0, state.limit - len(recent))),
                "x-ratelimit-reset-requests": f"{max(reset, 0.001) * 1000:.0f}ms",
            }
        return headers, over


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and hung up is part of the script, not an error


class FakeServer:
    """A threaded fake LLM server; use as a context manager."""

    def __init__(self) -> None:
        self.state = FakeState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL."""
        return f"{self.url}/v1"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


