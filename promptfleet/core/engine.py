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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from promptfleet.core import scorers
from promptfleet.core.costs import Budget, Spend, estimate_tokens
from promptfleet.core.limiter import Pacer
from promptfleet.core.messages import assistant, parse_conversation, user
from promptfleet.core.quantiles import QuantileSample
from promptfleet.core.rundir import Journal, now_stamp
from promptfleet.core.schemas import PARSED_KEY, SCHEMA_KEY, SchemaMismatch, parse_reply
from promptfleet.core.scorers import Scorer
from promptfleet.providers import Clients
from promptfleet.providers.base import Provider, ProviderError, Reply, parameters_of
from promptfleet.providers.errors import ErrorKind, classify

log = logging.getLogger("promptfleet.core.engine")

# Keys the engine writes; stale copies from a re-run failed file are dropped.
# What the provider reported about the model that answered (the last turn's, in a multi-turn prompt).
REPRODUCIBILITY_KEYS = ("model_version", "system_fingerprint", "request_id", "seed")
THINKING_KEY = "thinking_text"  # prompto's name: a reply's thoughts, a list a turn in multi-turn prompts
OUTPUT_KEYS = ("response", PARSED_KEY, THINKING_KEY, "error", "timestamp_sent", "latency_s", "attempts", "usage",
               "finish_reason", "input_line", "input_key", "batch", *REPRODUCIBILITY_KEYS)  # fmt: skip


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
    rate_now: float = 0.0
    stopped: bool = False
    budget_stop: str | None = None
    unsaved: int = 0  # outcomes that landed but the journal refused: asked again on resume
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    latencies: QuantileSample = field(default_factory=QuantileSample)  # fixed memory, whatever the queue's size
    score_keys: set[str] = field(default_factory=set)

    @property
    def done(self) -> int:
        return self.answered + self.failed

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        pick = lambda q: None if (v := self.latencies.quantile(q)) is None else round(v, 4)  # noqa: E731
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
            "rate_at_end": round(self.rate_now or self.rate, 1),
            "latency_p50_s": pick(0.5),
            "latency_p95_s": pick(0.95),
            "wall_s": round(self.elapsed, 3),
            "stopped": self.stopped,
            "budget_stop": self.budget_stop,
            "unsaved": self.unsaved,
            "score_keys": sorted(self.score_keys),
        }


@dataclass(frozen=True, slots=True)
class Prompt:
    """One input record on its way: where it came from and the key resume matches it by."""

    line: int
    key: str
    record: dict[str, Any]


@dataclass(slots=True)
class Answered:
    output: dict[str, Any]
    attempts: int
    first_sent: str
    latency: float


@dataclass(slots=True)
class Failed:
    error: ProviderError
    message: str
    attempts: int
    first_sent: str


@dataclass(slots=True)
class Stopped:
    """Stopped while backing off: left unjournaled for the resume."""


Outcome = Answered | Failed | Stopped


class _Conversation:
    """What a prompt has gathered so far; multi-turn progress survives a retried turn."""

    __slots__ = ("messages", "turns", "replies", "seq", "schema", "parsed", "rejected")

    def __init__(self, record: dict[str, Any]):
        conv = parse_conversation(record["prompt"], record.get("multimedia"))
        self.messages, self.turns = list(conv.messages), conv.later_turns
        self.replies: list[Reply] = []
        self.seq = 0  # the pacer's sequence number of the request sent last
        self.schema: dict[str, Any] | None = record.get(SCHEMA_KEY)
        self.parsed: list[Any] = []
        self.rejected: list[Reply] = []  # answers that did not match the schema: paid for, not kept

    async def advance(self, provider: Provider, model: str, params: dict[str, Any], pacer: Pacer, stats: QueueStats) -> None:
        asked = {"response_schema": self.schema} if self.schema is not None else {}  # providers without one never see the keyword
        steps = 1 + len(self.turns or ())
        sent_now = 0
        while len(self.replies) < steps:
            if sent_now:  # every turn is a request: it waits for its own send time
                self.seq = await pacer.pace()
            sent_now += 1
            stats.sent += 1
            reply = await provider.chat(model, self.messages, params, **asked)
            pacer.on_success(self.seq, reply.rate_limits)
            if self.schema is not None:
                try:
                    self.parsed.append(parse_reply(reply.text, self.schema))
                except SchemaMismatch as err:  # this turn is asked again, up to --max-attempts
                    self.rejected.append(reply)
                    raise ProviderError(str(err), kind=ErrorKind.SCHEMA) from None
            self.replies.append(reply)
            self.messages.append(assistant(reply.text))
            if len(self.replies) < steps:
                self.messages.append(user(self.turns[len(self.replies) - 1]))  # type: ignore[index]

    def output(self) -> dict[str, Any]:
        texts = [r.text for r in self.replies]
        out: dict[str, Any] = {"response": texts if self.turns is not None else texts[0]}
        if self.parsed:
            out[PARSED_KEY] = self.parsed if self.turns is not None else self.parsed[0]
        if any(r.thoughts for r in self.replies):
            thoughts = [list(r.thoughts) for r in self.replies]
            out[THINKING_KEY] = thoughts if self.turns is not None else thoughts[0]
        last = self.replies[-1]
        if self.turns is None:  # one reply: its counts as they are
            ins, outs, reasoning = last.input_tokens, last.output_tokens, last.reasoning_tokens
        else:
            ins, outs, reasoning = (_total(self.replies, key) for key in ("input_tokens", "output_tokens", "reasoning_tokens"))
        if ins is not None or outs is not None:
            out["usage"] = usage = {"input_tokens": ins, "output_tokens": outs}
            if reasoning is not None:
                usage["reasoning_tokens"] = reasoning
        if last.served_model:
            out["model"] = last.served_model  # prompto's key for what a self-hosted endpoint serves
        if last.finish_reason:
            out["finish_reason"] = last.finish_reason
        out.update({key: value for key in REPRODUCIBILITY_KEYS if (value := getattr(last, key)) is not None})
        return out


def _total(replies: list[Reply], key: str) -> int | None:
    """A count summed over the turns that reported it; None when none did."""
    counts = [n for r in replies if (n := getattr(r, key)) is not None]
    return sum(counts) if counts else None


def output_of(record: dict[str, Any], replies: list[Reply], spend: Spend | None = None, batch: bool = False) -> dict[str, Any]:
    """The output keys of a prompt answered by `replies` (batch mode's answers take this shape too),
    priced when `spend` is given."""
    conversation = _Conversation(record)
    conversation.replies = list(replies)
    return with_cost(conversation.output(), record, spend, batch)


def with_cost(output: dict[str, Any], record: dict[str, Any], spend: Spend | None, batch: bool = False) -> dict[str, Any]:
    """The answer's price in its usage (`cost_usd`), when its model has one."""
    usage = output.get("usage")
    if spend is not None and usage:
        cost = spend.cost_of(record["model_name"], usage.get("input_tokens"), usage.get("output_tokens"), batch, record["api"])
        if cost is not None:
            usage["cost_usd"] = round(cost, 9)
    return output


@dataclass
class QueueContext:
    """What every prompt of a queue shares."""

    clients: Clients
    pacer: Pacer
    journal: Journal
    stats: QueueStats
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    spend: Spend | None = None
    budget: Budget | None = None
    scorers: list[Scorer] = field(default_factory=list)
    grace: float = 120.0  # how long in-flight answers may take to land after a stop
    owns: Callable[[], bool] = lambda: True  # False once the run's claim is lost: send and journal nothing more


async def run_queue(prompts: Iterable[Prompt], ctx: QueueContext) -> QueueStats:
    """Send every prompt through the pacer, journal each outcome as it lands.

    When `ctx.stop` is set (Ctrl-C, SIGTERM, the budget, a failed journal write), no new
    prompt is sent, in-flight ones get `ctx.grace` seconds to land, and whatever is left
    stays unjournaled for a resume.
    """
    stats, stop = ctx.stats, ctx.stop
    tasks: set[asyncio.Task] = set()

    async def dispatch() -> None:
        for n, prompt in enumerate(prompts):
            if n == 0:
                _build_client(prompt, ctx)
            estimate = sum(estimate_tokens(prompt.record)) if ctx.pacer.limits_tokens else 0  # only a TPM limit needs it
            seq = await ctx.pacer.acquire(estimate)
            if stop.is_set() or not ctx.owns():  # stopped while this one waited for its send time: it stays unsent
                ctx.pacer.release()
                return
            task = asyncio.create_task(_handle(prompt, estimate, seq, ctx))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    dispatcher = asyncio.create_task(dispatch())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({dispatcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
        if not dispatcher.cancelled() and dispatcher.exception():
            raise dispatcher.exception()  # type: ignore[misc]
        if tasks and not stop.is_set():  # wait for everything, but react to a stop meanwhile
            waiter = asyncio.ensure_future(asyncio.wait(set(tasks)))
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if pending := {t for t in tasks if not t.done()}:
            _, late = await asyncio.wait(pending, timeout=ctx.grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
    finally:
        stopper.cancel()
        stats.stopped = stop.is_set()
        stats.finished = time.monotonic()
    return stats


def _build_client(prompt: Prompt, ctx: QueueContext) -> None:
    """Build the queue's client before its first send time. Built after it (an SDK client
    takes 40-120 ms), the first request leaves late, together with the next ones, and a
    provider counting requests per second sees one too many a second later."""
    try:
        ctx.clients.get(prompt.record["api"], prompt.record["model_name"])
    except ProviderError:
        pass  # the first attempt reports it


async def _handle(prompt: Prompt, estimate: int, seq: int, ctx: QueueContext) -> None:
    outcome = await attempt_until_done(prompt, estimate, seq, ctx)
    if ctx.owns():  # an answer landing after the claim was lost is the new owner's to ask
        record(prompt, outcome, estimate, ctx)


async def attempt_until_done(prompt: Prompt, estimate: int, seq: int, ctx: QueueContext) -> Outcome:
    """Send one prompt (it already holds a pacer slot) until it is answered, fails for good,
    or the run stops while it backs off."""
    stats, pacer, record_ = ctx.stats, ctx.pacer, prompt.record
    conversation = _Conversation(record_)
    model = record_["model_name"]
    first_sent = now_stamp()
    n = 0
    try:
        provider = ctx.clients.get(record_["api"], model)
    except ProviderError as err:
        ctx.pacer.release()
        return Failed(err, ctx.clients.redact(err.message), 1, first_sent)
    params = parameters_of(type(provider), record_)
    while True:
        n += 1
        if n > 1:
            seq = await pacer.acquire(estimate)
            if not ctx.owns():
                pacer.release()
                return Stopped()
        conversation.seq = seq
        sent_at = time.monotonic()
        stats.in_flight += 1
        try:
            await conversation.advance(provider, model, params, pacer, stats)
        except Exception as err:  # classified: a provider bug must not take the queue down
            error = classify(err)
        else:
            latency = time.monotonic() - sent_at
            stats.latencies.add(latency)
            return Answered(conversation.output(), n, first_sent, latency)
        finally:
            stats.in_flight -= 1
            stats.rate_now = pacer.rate
            pacer.release()

        while conversation.rejected:  # a reply refused by its schema still used tokens and money
            rejected = conversation.rejected.pop()
            _account(record_, {"input_tokens": rejected.input_tokens, "output_tokens": rejected.output_tokens}, estimate, ctx)
        if error.kind is ErrorKind.RATE_LIMIT:
            stats.rate_limited += 1
            pacer.on_rate_limited(conversation.seq, error.retry_after, error.rate_limits)
        message = ctx.clients.redact(error.message)
        if not error.retryable or n >= ctx.policy.max_attempts:
            return Failed(error, message, n, first_sent)
        delay = ctx.policy.delay(n, error.retry_after)
        log.info("line %d: %s (%s), retry %d in %.1fs, queue rate now %.0f/min", prompt.line, error.kind, error.status or "-", n, delay, pacer.rate)
        stats.retries += 1
        try:
            await asyncio.wait_for(ctx.stop.wait(), timeout=delay)
            return Stopped()
        except asyncio.TimeoutError:
            pass


def record(prompt: Prompt, outcome: Outcome, estimate: int, ctx: QueueContext) -> None:
    """Journal an outcome and count it; spend and budget follow an answer."""
    if isinstance(outcome, Stopped):
        return
    base = {k: v for k, v in prompt.record.items() if k not in OUTPUT_KEYS}
    if isinstance(outcome, Answered):
        output = with_cost(outcome.output, prompt.record, ctx.spend)
        done = {**base, **output, "timestamp_sent": outcome.first_sent, "latency_s": round(outcome.latency, 4),
                "attempts": outcome.attempts, "input_line": prompt.line, "input_key": prompt.key}  # fmt: skip
        if ctx.scorers:
            scores = scorers.apply(ctx.scorers, done)
            done.update(scores)
            ctx.stats.score_keys.update(scores)
        if ctx.journal.write("completed", done):
            ctx.stats.answered += 1
        else:
            ctx.stats.unsaved += 1
        _account(prompt.record, outcome.output.get("usage"), estimate, ctx)
        return
    error = outcome.error
    log.warning("line %d (%s/%s) failed after %d attempt(s): %s", prompt.line, prompt.record["api"], prompt.record["model_name"], outcome.attempts, outcome.message)
    failed = {**base, "error": {"type": str(error.kind), "status": error.status, "message": outcome.message,
                                "attempts": outcome.attempts},
              "timestamp_sent": outcome.first_sent, "input_line": prompt.line, "input_key": prompt.key}  # fmt: skip
    if ctx.journal.write("failed", failed):
        ctx.stats.failed += 1
    else:
        ctx.stats.unsaved += 1


def _account(record: dict[str, Any], usage: dict[str, Any] | None, estimate: int, ctx: QueueContext) -> None:
    """Spend, budget and the token estimate's correction, after an answer landed."""
    if not usage:
        return
    used = (usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0)
    if ctx.pacer.limits_tokens and used > estimate:
        ctx.pacer.owe_tokens(used - estimate)
    if ctx.spend is None:
        return
    ctx.spend.add(record["model_name"], usage.get("input_tokens"), usage.get("output_tokens"), api=record["api"],
                  reasoning_tokens=usage.get("reasoning_tokens"))  # fmt: skip
    if ctx.budget and (reason := ctx.budget.exceeded_by(ctx.spend)) and not ctx.stop.is_set():
        log.warning("budget reached: %s; no new requests, in-flight answers still land", reason)
        ctx.stats.budget_stop = reason
        ctx.stop.set()
