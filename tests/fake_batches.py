"""A local fake (127.0.0.1 only) of the providers' batch APIs, for tests and the offline example:

- OpenAI `/v1/files` + `/v1/batches` (Azure's `/openai/files` + `/openai/batches` too),
- Anthropic `/v1/messages/batches` (+ `/results`),
- Gemini `/v1beta/models/{model}:batchGenerateContent` and `/v1beta/batches`.

Each batch walks its provider's states, one step per look at it (a retrieve, or a listing),
`polls_to_finish` steps, unless `hold` keeps it running. Per prompt text, `script` plays
outcomes in the batches the prompt is in: an HTTP status (that line errors), or "expired".
`expire` makes batches expire with only their first `keep` lines answered. `submissions`
counts how often each prompt was in a created batch, `answered` how often it was answered
(what is paid): duplicates and losses are visible.

Faults, per route (`upload`, `files`, `delete`, `create`, `status`, `list`, `download`,
`cancel`), optionally for one protocol (`"gemini:status"`): `faults` answers the next calls
with these statuses before doing anything; `faults_after` does the work, then answers the
status (a create whose answer is lost); `stall = (route, "before" | "after")` holds the next
call (`stalled` is set) until `release`, for a kill -9 at that very point. `calls` counts
each route's calls.

Serve it for the offline example:  python -m tests.fake_batches --port 8765
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tests.fakes import PROTOCOLS


@dataclass
class Job:
    id: str
    protocol: str  # openai | anthropic | gemini
    model: str
    requests: list[tuple[str, dict[str, Any]]]  # (custom id, request body)
    label: str | None = None
    created: float = field(default_factory=time.time)
    polls: int = 0
    state: str = "running"  # running | completed | expired | cancelled
    cancel_requested: bool = False
    held: bool = False  # this batch alone keeps running
    results: list[tuple[str, Any]] | None = None  # (custom id, ("ok", body) | ("error", status, message) | ("expired",) | ("cancelled",))


@dataclass
class FakeFile:
    name: str
    data: bytes
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class FakeBatchState:
    polls_to_finish: int = 2
    hold: bool = False
    expire: bool = False
    keep: int = 0  # lines answered in an expired or cancelled batch
    faults: dict[str, list[int]] = field(default_factory=dict)  # route -> statuses answered instead of doing the work
    faults_after: dict[str, list[int]] = field(default_factory=dict)  # route -> statuses answered after doing it
    stall: tuple[str, str] | None = None  # (route, "before" | "after"): hold that call until `release`
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    script: dict[str, list[int | str]] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    files: dict[str, FakeFile] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    calls: Counter = field(default_factory=Counter)  # per route, and per protocol:route
    submissions: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)
    online: Counter = field(default_factory=Counter)  # prompts answered by the online chat route
    creates: Counter = field(default_factory=Counter)  # per protocol
    most_live: int = 0  # the most batches running at once
    corrupt_results: int = 0  # this many result downloads answer garbage
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Any = field(default_factory=lambda: itertools.count(1))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids):06d}"

    @property
    def live_files(self) -> dict[str, FakeFile]:
        return {k: f for k, f in self.files.items() if k not in self.deleted}


class _Stall(Exception):
    """The call is held before it does anything."""


def _error(status: int) -> tuple[int, dict[str, Any]]:
    """An error body every SDK reads: OpenAI's and Anthropic's `error.message`, Google's `error.code`."""
    return status, {"type": "error", "error": {"code": status, "message": f"fake error {status}", "type": "api_error", "status": "UNAVAILABLE"}}


def _text_of(protocol: str, body: dict[str, Any]) -> str:
    return PROTOCOLS[protocol][0](body)


def _finish(state: FakeBatchState, job: Job, ending: str) -> None:
    """Decide every line's outcome once, when the batch ends."""
    job.state = ending
    results = []
    for n, (cid, body) in enumerate(job.requests):
        text = _text_of(job.protocol, body)
        if ending != "completed" and n >= state.keep:
            results.append((cid, ("expired",) if ending == "expired" else ("cancelled",)))
            continue
        pending = state.script.get(text)
        step = pending.pop(0) if pending else None
        if step == "expired":
            results.append((cid, ("expired",)))
        elif step is not None:
            results.append((cid, ("error", int(step), f"fake error {step}")))
        else:
            state.answered[text] += 1
            results.append((cid, ("ok", PROTOCOLS[job.protocol][1](body, f"answer to: {text}", len(text.split())))))
    job.results = results


def _advance(state: FakeBatchState, job: Job) -> None:
    if job.state != "running":
        return
    job.polls += 1
    if job.cancel_requested:
        _finish(state, job, "cancelled")
    elif not (state.hold or job.held) and job.polls > state.polls_to_finish:
        _finish(state, job, "expired" if state.expire else "completed")


def _counts(job: Job) -> tuple[int, int, int]:
    total = len(job.requests)
    ok = sum(1 for _, r in job.results or [] if r[0] == "ok")
    return total, ok, len(job.results or []) - ok


# -- OpenAI / Azure ---------------------------------------------------------------------------------

_OPENAI_STATUS = {"running": "in_progress", "completed": "completed", "expired": "expired", "cancelled": "cancelled"}


def _openai_batch(job: Job) -> dict[str, Any]:
    total, ok, failed = _counts(job)
    status = _OPENAI_STATUS[job.state] if job.polls else "validating"
    if job.state == "running" and job.cancel_requested:
        status = "cancelling"
    ended = job.state != "running"
    return {
        "id": job.id, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": f"in-{job.id}",
        "completion_window": "24h", "status": status, "created_at": int(job.created),
        "output_file_id": f"out-{job.id}" if ended and ok else None,
        "error_file_id": f"err-{job.id}" if ended and failed else None,
        "request_counts": {"total": total, "completed": ok, "failed": failed},
        "metadata": {"promptfleet": job.label} if job.label else None,
    }  # fmt: skip


def _openai_file(job: Job, errors: bool) -> bytes:
    lines = []
    for cid, result in job.results or []:
        if (result[0] == "ok") == errors:
            continue
        if result[0] == "ok":
            line = {"id": f"req-{cid}", "custom_id": cid, "response": {"status_code": 200, "request_id": "r", "body": result[1]}, "error": None}
        elif result[0] == "error":
            body = {"error": {"message": result[2], "type": "server_error" if result[1] >= 500 else "invalid_request_error"}}
            line = {"id": f"req-{cid}", "custom_id": cid, "response": {"status_code": result[1], "request_id": "r", "body": body}, "error": None}
        else:
            code = "batch_expired" if result[0] == "expired" else "batch_cancelled"
            line = {"id": f"req-{cid}", "custom_id": cid, "response": None, "error": {"code": code, "message": f"fake {code}"}}
        lines.append(json.dumps(line))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _multipart_file(content_type: str, body: bytes) -> tuple[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_filename() or "upload.jsonl", part.get_payload(decode=True)
    raise ValueError("no file part")


def _openai_file_object(file_id: str, file: FakeFile) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": len(file.data), "created_at": file.created, "filename": file.name,
            "purpose": "batch", "status": "processed"}  # fmt: skip


# -- Anthropic --------------------------------------------------------------------------------------


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _anthropic_batch(job: Job, base: str) -> dict[str, Any]:
    results = job.results or []
    kinds = Counter({"ok": "succeeded", "error": "errored", "expired": "expired", "cancelled": "canceled"}[r[0]] for _, r in results)
    ended = job.state != "running"
    return {
        "id": job.id, "type": "message_batch", "processing_status": "ended" if ended else ("canceling" if job.cancel_requested else "in_progress"),
        "request_counts": {"processing": 0 if ended else len(job.requests), "succeeded": kinds["succeeded"], "errored": kinds["errored"],
                           "canceled": kinds["canceled"], "expired": kinds["expired"]},
        "created_at": _iso(job.created), "expires_at": _iso(job.created + 86400), "ended_at": _iso(time.time()) if ended else None,
        "cancel_initiated_at": _iso(job.created) if job.cancel_requested else None, "archived_at": None,
        "results_url": f"{base}/v1/messages/batches/{job.id}/results" if ended else None,
    }  # fmt: skip


def _anthropic_results(job: Job) -> bytes:
    lines = []
    for cid, result in job.results or []:
        if result[0] == "ok":
            outcome = {"type": "succeeded", "message": result[1]}
        elif result[0] == "error":
            kind = "api_error" if result[1] >= 500 else "invalid_request_error"
            outcome = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": result[2]}}}
        else:
            outcome = {"type": "expired" if result[0] == "expired" else "canceled"}
        lines.append(json.dumps({"custom_id": cid, "result": outcome}))
    return ("\n".join(lines) + "\n").encode()


# -- Gemini -----------------------------------------------------------------------------------------

_GEMINI_STATE = {"running": "BATCH_STATE_RUNNING", "completed": "BATCH_STATE_SUCCEEDED", "expired": "BATCH_STATE_EXPIRED",
                 "cancelled": "BATCH_STATE_CANCELLED"}  # fmt: skip


def _gemini_operation(job: Job) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": job.model, "displayName": job.label, "createTime": _iso(job.created),
        "state": _GEMINI_STATE[job.state] if job.polls else "BATCH_STATE_PENDING",
    }  # fmt: skip
    if job.state != "running":
        responses = []
        for cid, result in job.results or []:
            if result[0] == "ok":
                responses.append({"response": result[1], "metadata": {"key": cid}})
            elif result[0] == "error":
                code = 13 if result[1] >= 500 else 3
                responses.append({"error": {"code": code, "message": result[2]}, "metadata": {"key": cid}})
            # expired or cancelled lines have no response at all
        metadata["output"] = {"inlinedResponses": {"inlinedResponses": responses}}
    return {"name": job.id, "metadata": metadata, "done": job.state != "running"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeBatchState

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("content-length", 0)))

    @property
    def _base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        body = self._body() if method == "POST" else b""
        state = self.state
        self._stall_after, self._status_after = False, None
        with state.lock:
            try:
                reply = self._dispatch(method, path, body)
            except _Stall:
                reply = None
            except KeyError as err:
                reply = (404, {"error": {"code": 404, "message": f"not found: {err}", "type": "not_found_error", "status": "NOT_FOUND"}})
        if reply is None or self._stall_after:
            state.stalled.set()
            state.release.wait(30)
            reply = reply or _error(502)
        if self._status_after:
            reply = _error(self._status_after)
        self._send(*reply)

    def _gate(self, protocol: str, route: str) -> tuple | None:
        """Count the call; play the fault or stall set for it (see the module docstring)."""
        state = self.state
        state.calls[route] += 1
        state.calls[f"{protocol}:{route}"] += 1
        for key in (f"{protocol}:{route}", route):
            if state.stall and state.stall[0] == key:
                phase, state.stall = state.stall[1], None
                if phase == "before":
                    raise _Stall
                self._stall_after = True
                return None
            if state.faults.get(key):
                return _error(state.faults[key].pop(0))
            if state.faults_after.get(key):
                self._status_after = state.faults_after[key].pop(0)
                return None
        return None

    def _looked_at(self, protocol: str) -> list[Job]:
        """A listing is a look at every batch of the protocol: each takes its step."""
        jobs = [j for j in reversed(self.state.jobs.values()) if j.protocol == protocol]
        for job in jobs:
            _advance(self.state, job)
        return jobs

    def _dispatch(self, method: str, path: str, body: bytes) -> tuple:
        state = self.state
        if "x-goog-api-key" in self.headers:  # Gemini's paths overlap OpenAI's
            return self._gemini(method, path, body)
        # OpenAI and Azure
        if re.fullmatch(r"/(?:v1|openai)/files", path):
            if method == "GET":
                if fault := self._gate("openai", "files"):
                    return fault
                files = sorted(state.live_files.items(), key=lambda kv: (kv[1].created, kv[0]), reverse=True)
                return 200, {"object": "list", "data": [_openai_file_object(k, f) for k, f in files], "has_more": False}
            if fault := self._gate("openai", "upload"):
                return fault
            name, data = _multipart_file(self.headers["content-type"], body)
            file_id = state.new_id("file-")
            state.files[file_id] = FakeFile(name, data)
            return 200, _openai_file_object(file_id, state.files[file_id])
        if (m := re.fullmatch(r"/(?:v1|openai)/files/([^/]+)", path)) and method == "DELETE":
            if fault := self._gate("openai", "delete"):
                return fault
            if m.group(1) not in state.live_files:
                raise KeyError(m.group(1))
            state.deleted.add(m.group(1))
            return 200, {"id": m.group(1), "object": "file", "deleted": True}
        if m := re.fullmatch(r"/(?:v1|openai)/files/(out|err)-([^/]+)/content", path):
            if fault := self._gate("openai", "download"):
                return fault
            if state.corrupt_results:
                state.corrupt_results -= 1
                return 200, b'{"custom_id": "line-1", "respo\n<html>502 Bad Gateway</html>\n', "application/octet-stream"
            return 200, _openai_file(state.jobs[m.group(2)], errors=m.group(1) == "err"), "application/octet-stream"
        if re.fullmatch(r"/(?:v1|openai)/batches", path):
            if method == "GET":
                if fault := self._gate("openai", "list"):
                    return fault
                jobs = [_openai_batch(j) for j in self._looked_at("openai")]
                return 200, {"object": "list", "data": jobs, "has_more": False,
                             "first_id": jobs[0]["id"] if jobs else None, "last_id": jobs[-1]["id"] if jobs else None}  # fmt: skip
            if fault := self._gate("openai", "create"):
                return fault
            spec = json.loads(body)
            lines = [json.loads(t) for t in state.live_files[spec["input_file_id"]].data.decode().splitlines() if t.strip()]
            requests = [(line["custom_id"], line["body"]) for line in lines]
            return 200, _openai_batch(self._create("openai", lines[0]["body"]["model"], requests, (spec.get("metadata") or {}).get("promptfleet")))
        if m := re.fullmatch(r"/(?:v1|openai)/batches/([^/]+)(/cancel)?", path):
            if fault := self._gate("openai", "cancel" if m.group(2) else "status"):
                return fault
            job = state.jobs[m.group(1)]
            if m.group(2):
                job.cancel_requested = job.state == "running"
            else:
                _advance(state, job)
            return 200, _openai_batch(job)
        if path.endswith("/chat/completions"):  # the online path, for multi-turn prompts and the fallback
            payload = json.loads(body)
            text = _text_of("openai", payload)
            state.online[text] += 1
            return 200, PROTOCOLS["openai"][1](payload, f"answer to: {text}", len(text.split()))
        # Anthropic
        if path == "/v1/messages/batches":
            if method == "GET":
                if fault := self._gate("anthropic", "list"):
                    return fault
                jobs = [_anthropic_batch(j, self._base) for j in self._looked_at("anthropic")]
                return 200, {"data": jobs, "has_more": False, "first_id": jobs[0]["id"] if jobs else None,
                             "last_id": jobs[-1]["id"] if jobs else None}  # fmt: skip
            if fault := self._gate("anthropic", "create"):
                return fault
            requests = [(r["custom_id"], r["params"]) for r in json.loads(body)["requests"]]
            return 200, _anthropic_batch(self._create("anthropic", requests[0][1]["model"], requests, None), self._base)
        if m := re.fullmatch(r"/v1/messages/batches/([^/]+)(/cancel|/results)?", path):
            route = {"/results": "download", "/cancel": "cancel"}.get(m.group(2) or "", "status")
            if fault := self._gate("anthropic", route):
                return fault
            job = state.jobs[m.group(1)]
            if route == "download":
                if state.corrupt_results:
                    state.corrupt_results -= 1
                    return 200, b"<html>502 Bad Gateway</html>\n", "application/binary"
                return 200, _anthropic_results(job), "application/binary"
            if route == "cancel":
                job.cancel_requested = job.state == "running"
            else:
                _advance(state, job)
            return 200, _anthropic_batch(job, self._base)
        return 404, {"error": {"code": 404, "message": f"no route {method} {path}", "type": "not_found_error"}}

    def _gemini(self, method: str, path: str, body: bytes) -> tuple:
        state = self.state
        if m := re.fullmatch(r"/v1(?:beta)?/models/([^/:]+):batchGenerateContent", path):
            if fault := self._gate("gemini", "create"):
                return fault
            batch = json.loads(body)["batch"]
            items = batch["inputConfig"]["requests"]["requests"]
            requests = [(item.get("metadata", {}).get("key", str(n)), item["request"]) for n, item in enumerate(items)]
            return 200, _gemini_operation(self._create("gemini", m.group(1), requests, batch.get("displayName")))
        if path in ("/v1/batches", "/v1beta/batches"):
            if fault := self._gate("gemini", "list"):
                return fault
            return 200, {"operations": [_gemini_operation(j) for j in self._looked_at("gemini")]}
        if m := re.fullmatch(r"/v1(?:beta)?/(batches/[^/:]+)(:cancel)?", path):
            if fault := self._gate("gemini", "cancel" if m.group(2) else "status"):
                return fault
            job = state.jobs[m.group(1)]
            if m.group(2):
                job.cancel_requested = job.state == "running"
                return 200, {}
            _advance(state, job)
            return 200, _gemini_operation(job)
        return 404, {"error": {"code": 404, "message": f"no route {method} {path}", "status": "NOT_FOUND"}}

    def _create(self, protocol: str, model: str, requests: list[tuple[str, dict]], label: str | None) -> Job:
        state = self.state
        prefix = {"openai": "batch_", "anthropic": "msgbatch_", "gemini": "batches/"}[protocol]
        job = Job(state.new_id(prefix), protocol, model, requests, label)
        state.jobs[job.id] = job
        state.creates[protocol] += 1
        state.most_live = max(state.most_live, sum(1 for j in state.jobs.values() if j.state == "running"))
        for _, body in requests:
            state.submissions[_text_of(protocol, body)] += 1
        return job


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class FakeBatchServer:
    """The threaded fake; a context manager. `env()` gives the variables that point the SDKs at it."""

    def __init__(self, port: int = 0) -> None:
        self.state = FakeBatchState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = _QuietServer(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def env(self) -> dict[str, str]:
        return {
            "OPENAI_API_KEY": "sk-fake-batch-0000000000", "OPENAI_BASE_URL": f"{self.url}/v1",
            "AZURE_OPENAI_API_KEY": "fake-azure-key-000000", "AZURE_OPENAI_API_ENDPOINT": self.url,
            "ANTHROPIC_API_KEY": "sk-ant-fake-0000000000", "ANTHROPIC_BASE_URL": self.url,
            "GEMINI_API_KEY": "fake-gemini-key-000000", "GEMINI_BASE_URL": self.url,
        }  # fmt: skip

    def __enter__(self) -> FakeBatchServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--env-file", help="also write the variables to this .env file")
    args = parser.parse_args()
    with FakeBatchServer(args.port) as server:
        lines = [f"{k}={v}" for k, v in server.env().items()]
        if args.env_file:
            with open(args.env_file, "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
        print(f"fake batch APIs on {server.url} (Ctrl-C to stop); point promptfleet at it with:")
        print("\n".join(lines), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
