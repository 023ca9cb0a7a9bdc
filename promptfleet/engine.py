"""Runs one queue of prompts: paced sends, bounded concurrency, retries, journal.

Plain asyncio and no Prefect, so the hot path is testable in milliseconds and can run
under any orchestrator. A prompt ends in exactly one of three states: answered
(completed file), failed for good (failed file), or not finished because the run was
stopped (picked up again on resume).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from promptfleet.limiter import Pacer
from promptfleet.providers import Clients
from promptfleet.providers.base import Message, ProviderError, Reply
from promptfleet.results import Journal, now_stamp

log = logging.getLogger("promptfleet.engine")

# Keys the engine writes; stale copies from a re-run failed file are dropped.
OUTPUT_KEYS = ("response", "error", "timestamp_sent", "latency_s", "attempts", "usage", "finish_reason", "input_line")


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter; `Retry-After` wins when the provider sends it."""

    max_attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after) + random.uniform(0, 0.1)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class QueueStats:
    name: str
    rate: float
    total: int = 0
    skipped: int = 0
    sent: int = 0
    answered: int = 0
    failed: int = 0
    retries: int = 0
    rate_limited: int = 0
    in_flight: int = 0
    stopped: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    latencies: array = field(default_factory=lambda: array("d"))

    @property
    def done(self) -> int:
        return self.answered + self.failed

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None  # noqa: E731
        return {
            "queue": self.name,
            "rate_per_minute": self.rate,
            "prompts": self.total,
            "already_done": self.skipped,
            "answered": self.answered,
            "failed": self.failed,
            "requests": self.sent,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "latency_p50_s": pick(0.5),
            "latency_p95_s": pick(0.95),
            "wall_s": round(self.elapsed, 3),
            "stopped": self.stopped,
        }


def conversation(record: dict[str, Any]) -> tuple[list[Message], list[str] | None]:
    """Messages to send first, and the remaining user turns of a multi-turn prompt."""
    prompt = record["prompt"]
    media = [dict(item, type=item.get("type", "image")) for item in record.get("multimedia") or []]
    if isinstance(prompt, str):
        return [_user(prompt, media)], None
    if all(isinstance(p, str) for p in prompt):
        return [_user(prompt[0], media)], list(prompt[1:])
    messages = [dict(m) for m in prompt]
    if media:
        last = messages[-1]
        content = last.get("content", last.get("parts"))
        last["content"] = (content if isinstance(content, list) else [content]) + media
    return messages, None


def _user(text: str, media: list[dict[str, Any]]) -> Message:
    return {"role": "user", "content": [text, *media] if media else text}


class _Attempt:
    """What a prompt has gathered so far; multi-turn progress survives a retried turn."""

    __slots__ = ("messages", "turns", "responses", "replies")

    def __init__(self, record: dict[str, Any]):
        self.messages, self.turns = conversation(record)
        self.responses: list[str] = []
        self.replies: list[Reply] = []

    async def run(self, clients: Clients, record: dict[str, Any]) -> None:
        provider = clients.get(record["api"], record["model_name"])
        params = record.get("parameters") or {}
        steps = 1 + len(self.turns or [])
        while len(self.replies) < steps:
            reply = await provider.chat(record["model_name"], self.messages, params)
            self.replies.append(reply)
            self.messages = [*self.messages, {"role": "assistant", "content": reply.text}]
            if len(self.replies) < steps:
                self.messages.append({"role": "user", "content": self.turns[len(self.replies) - 1]})

    def output(self) -> dict[str, Any]:
        texts = [r.text for r in self.replies]
        out: dict[str, Any] = {"response": texts if self.turns is not None else texts[0]}
        ins = [r.input_tokens for r in self.replies if r.input_tokens is not None]
        outs = [r.output_tokens for r in self.replies if r.output_tokens is not None]
        if ins or outs:
            out["usage"] = {"input_tokens": sum(ins) if ins else None, "output_tokens": sum(outs) if outs else None}
        if reason := self.replies[-1].finish_reason:
            out["finish_reason"] = reason
        return out


async def run_queue(
    items: Iterable[tuple[int, dict[str, Any]]],
    *,
    clients: Clients,
    pacer: Pacer,
    journal: Journal,
    stats: QueueStats,
    policy: RetryPolicy | None = None,
    stop: asyncio.Event | None = None,
    grace: float = 10.0,
) -> QueueStats:
    """Send every item through `pacer`, journal each outcome as it lands.

    When `stop` is set, no new prompt is sent, in-flight ones get `grace` seconds to
    land, and whatever is left stays unjournaled for a resume.
    """
    policy = policy or RetryPolicy()
    stop = stop or asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def dispatch() -> None:
        for line, record in items:
            await pacer.acquire()
            task = asyncio.create_task(_handle(line, record, clients, pacer, journal, stats, policy, stop))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    dispatcher = asyncio.create_task(dispatch())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({dispatcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            dispatcher.cancel()
            stats.stopped = True
        await asyncio.gather(dispatcher, return_exceptions=True)
        if dispatcher.done() and not dispatcher.cancelled() and dispatcher.exception():
            raise dispatcher.exception()  # type: ignore[misc]
        if tasks:
            pending = set(tasks)
            if not stop.is_set():
                # Wait for everything, but react to a stop that comes while we wait.
                waiter = asyncio.ensure_future(asyncio.wait(pending))
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                pending = {t for t in pending if not t.done()}
                stats.stopped = stats.stopped or bool(pending)
            if pending:
                _, late = await asyncio.wait(pending, timeout=grace)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
    finally:
        stopper.cancel()
        stats.finished = time.monotonic()
    return stats


async def _handle(
    line: int,
    record: dict[str, Any],
    clients: Clients,
    pacer: Pacer,
    journal: Journal,
    stats: QueueStats,
    policy: RetryPolicy,
    stop: asyncio.Event,
) -> None:
    """One prompt, from first send to its journal line. Holds a pacer slot while sending."""
    attempt = _Attempt(record)
    base = {k: v for k, v in record.items() if k not in OUTPUT_KEYS}
    n = 0
    holding = True  # the dispatcher acquired the first slot for us
    first_sent = None
    while True:
        n += 1
        if not holding:
            await pacer.acquire()
        sent_at = time.monotonic()
        first_sent = first_sent or now_stamp()
        stats.sent += 1
        stats.in_flight += 1
        try:
            await attempt.run(clients, record)
        except ProviderError as err:
            error = err
        except Exception as err:  # a provider bug must not take the queue down
            error = ProviderError(f"{type(err).__name__}: {err}", kind="unexpected")
        else:
            latency = time.monotonic() - sent_at
            stats.latencies.append(latency)
            journal.write(
                "completed",
                {**base, **attempt.output(), "timestamp_sent": first_sent, "latency_s": round(latency, 4), "attempts": n, "input_line": line},
            )
            stats.answered += 1
            return
        finally:
            stats.in_flight -= 1
            pacer.release()
            holding = False

        if error.kind == "rate_limit":
            stats.rate_limited += 1
            if error.retry_after:
                pacer.pause(error.retry_after)
        message = clients.redact(error.message)
        if not error.retryable or n >= policy.max_attempts:
            log.warning("line %d (%s/%s) failed after %d attempt(s): %s", line, record["api"], record["model_name"], n, message)
            journal.write(
                "failed",
                {
                    **base,
                    "error": {"type": error.kind, "status": error.status, "message": message, "attempts": n},
                    "timestamp_sent": first_sent,
                    "input_line": line,
                },
            )
            stats.failed += 1
            return
        delay = policy.delay(n, error.retry_after)
        log.info("line %d: %s (%s), retry %d in %.1fs", line, error.kind, error.status or "-", n, delay)
        stats.retries += 1
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
            return  # stopped while backing off: left for the resume
        except asyncio.TimeoutError:
            pass
