"""A fast fake LLM server for benchmarks (asyncio: starlette + uvicorn), speaking the
OpenAI, Anthropic, Gemini and Ollama wire protocols, with per-model latency, per-model rate
limits enforced with 429 + Retry-After (and stated in OpenAI's or Anthropic's rate-limit
headers with `"limit_headers": true`), injected faults, a serial mode (one request at a
time, like a local Ollama), and per-prompt request counts at GET /stats.

    python -m benchmarks.fake_server --port 8123 --config '{"latency": {"default": 0.3}}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter, defaultdict, deque
from datetime import datetime, timedelta, timezone

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class Fake:
    def __init__(self, config: dict):
        self.latency: dict = config.get("latency", {"default": 0.0})
        self.rpm: dict = config.get("rpm", {})  # model -> requests per window
        self.window: float = config.get("window", 60.0)
        self.limit_headers: bool = config.get("limit_headers", False)  # state the limit in every answer
        # {"429": p, "500": p, "retry_after": s, "429_once": bool}; with 429_once a prompt's
        # first request alone may draw the 429 ("20% of prompts get one 429 each")
        self.faults: dict = config.get("faults", {})
        self.serial = asyncio.Lock() if config.get("serial") else None
        self.calls: Counter = Counter()
        self.answered: Counter = Counter()
        self.rejected = 0
        self.stamps: list[float] = []  # wall-clock arrival of every request: where a command's time goes
        self.log: list[tuple[float, str, int]] = []  # (arrival, prompt, status), for /stats?stamps=1
        self.seen: dict[str, deque] = defaultdict(deque)
        self.random = random.Random(config.get("seed", 7))

    def _limited(self, model: str) -> tuple[float | None, dict]:
        """A sliding-window limit: seconds to wait when over it, and the headers stating it."""
        limit = self.rpm.get(model, self.rpm.get("default"))
        if not limit:
            return None, {}
        now = time.monotonic()
        seen = self.seen[model]
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        wait = seen[0] + self.window - now if len(seen) >= limit else None
        if wait is None:
            seen.append(now)
        if not self.limit_headers:
            return wait, {}
        reset = seen[0] + self.window - now if seen else self.window
        return wait, {"limit": str(round(limit * 60 / self.window)), "remaining": str(max(0, limit - len(seen))), "reset": reset}

    async def answer(self, model: str, text: str) -> tuple[int, dict, dict]:
        arrived = time.time()
        status, headers, body = await self._answer(model, text)
        self.log.append((arrived, text, status))
        return status, headers, body

    async def _answer(self, model: str, text: str) -> tuple[int, dict, dict]:
        self.calls[text] += 1
        self.stamps.append(time.time())
        wait, stated = self._limited(model)
        if wait is not None:
            self.rejected += 1
            return 429, {"retry-after": f"{max(wait, 0.05):.2f}"}, {"stated": stated}
        roll = self.random.random()
        if roll < self.faults.get("429", 0):
            if self.calls[text] == 1 or not self.faults.get("429_once"):
                return 429, {"retry-after": str(self.faults.get("retry_after", 1))}, {}
        elif roll < self.faults.get("429", 0) + self.faults.get("500", 0):
            return 500, {}, {}
        delay = self.latency.get(model, self.latency.get("default", 0.0))
        if self.serial:
            async with self.serial:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(delay)
        self.answered[text] += 1
        return 200, {}, {"text": f"answer to: {text}", "n": len(text.split()), "stated": stated}


def openai_headers(stated: dict) -> dict:
    if not stated:
        return {}
    return {"x-ratelimit-limit-requests": stated["limit"], "x-ratelimit-remaining-requests": stated["remaining"],
            "x-ratelimit-reset-requests": f"{max(stated['reset'], 0.001) * 1000:.0f}ms"}  # fmt: skip


def anthropic_headers(stated: dict) -> dict:
    if not stated:
        return {}
    reset = datetime.now(timezone.utc) + timedelta(seconds=stated["reset"])
    return {"anthropic-ratelimit-requests-limit": stated["limit"], "anthropic-ratelimit-requests-remaining": stated["remaining"],
            "anthropic-ratelimit-requests-reset": reset.isoformat(timespec="milliseconds").replace("+00:00", "Z")}  # fmt: skip


def _last_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)


def build(fake: Fake) -> Starlette:
    async def openai(request: Request) -> Response:
        body = json.loads(await request.body())
        status, headers, out = await fake.answer(body["model"], _last_text(body))
        stated = openai_headers(out.get("stated", {}))
        if status != 200:
            return JSONResponse({"error": {"message": f"fake {status}", "type": "fake"}}, status, {**headers, **stated})
        n = out["n"]
        return JSONResponse({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n, "completion_tokens": n + 2, "total_tokens": 2 * n + 2},
        }, headers=stated)  # fmt: skip

    async def anthropic(request: Request) -> Response:
        body = json.loads(await request.body())
        status, headers, out = await fake.answer(body["model"], _last_text(body))
        stated = anthropic_headers(out.get("stated", {}))
        if status != 200:
            kind = "rate_limit_error" if status == 429 else "api_error"
            return JSONResponse({"type": "error", "error": {"type": kind, "message": f"fake {status}"}}, status, {**headers, **stated})
        n = out["n"]
        return JSONResponse({
            "id": "msg_x", "type": "message", "role": "assistant", "model": body["model"], "stop_reason": "end_turn",
            "stop_sequence": None, "content": [{"type": "text", "text": out["text"]}],
            "usage": {"input_tokens": n, "output_tokens": n + 2},
        }, headers=stated)  # fmt: skip

    async def gemini(request: Request) -> Response:
        body = json.loads(await request.body())
        model = request.path_params["model"].removeprefix("models/").split(":")[0]
        text = " ".join(p.get("text", "") for p in body["contents"][-1]["parts"])
        status, headers, out = await fake.answer(model, text)
        if status != 200:
            return JSONResponse({"error": {"code": status, "message": f"fake {status}", "status": "X"}}, status, headers)
        n = out["n"]
        return JSONResponse({
            "candidates": [{"content": {"role": "model", "parts": [{"text": out["text"]}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": n, "candidatesTokenCount": n + 2, "totalTokenCount": 2 * n + 2},
        })  # fmt: skip

    async def ollama(request: Request) -> Response:
        body = json.loads(await request.body())
        text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        status, headers, out = await fake.answer(body["model"], text)
        if status != 200:
            return JSONResponse({"error": f"fake {status}"}, status, headers)
        n = out["n"]
        reply = {"model": body["model"], "created_at": "2026-01-01T00:00:00Z", "done": True, "done_reason": "stop",
                 "prompt_eval_count": n, "eval_count": n + 2}  # fmt: skip
        if "messages" in body:
            reply["message"] = {"role": "assistant", "content": out["text"]}
        else:
            reply["response"] = out["text"]
        return JSONResponse(reply)

    async def tags(request: Request) -> Response:  # Ollama's model list, which clients check
        return JSONResponse({"models": [{"name": "llama3", "model": "llama3"}]})

    async def stats(request: Request) -> Response:
        return JSONResponse({"calls": dict(fake.calls), "answered": dict(fake.answered), "rejected": fake.rejected,
                             "requests": sum(fake.calls.values()), "first": min(fake.stamps, default=None),
                             "last": max(fake.stamps, default=None)}
                            | ({"stamps": fake.stamps, "log": fake.log} if request.query_params.get("stamps") else {}))  # fmt: skip

    async def reset(request: Request) -> Response:
        fake.calls.clear()
        fake.stamps.clear()
        fake.log.clear()
        fake.answered.clear()
        fake.rejected = 0
        fake.seen.clear()
        return JSONResponse({})

    return Starlette(routes=[
        Route("/v1/chat/completions", openai, methods=["POST"]),
        Route("/v1/messages", anthropic, methods=["POST"]),
        Route("/{version}/models/{model:path}", gemini, methods=["POST"]),
        Route("/api/chat", ollama, methods=["POST"]),
        Route("/api/generate", ollama, methods=["POST"]),
        Route("/api/tags", tags),
        Route("/stats", stats),
        Route("/reset", reset, methods=["POST"]),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", default="{}")
    args = parser.parse_args()
    uvicorn.run(build(Fake(json.loads(args.config))), host="127.0.0.1", port=args.port, log_level="warning",
                backlog=4096, timeout_keep_alive=60)  # fmt: skip


if __name__ == "__main__":
    main()
