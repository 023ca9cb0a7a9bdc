"""Batch mode for one run: reconcile → poll and collect → submit → wait, until no batch is live.

Each pass first settles what the journal left open (intents without a batch id), then asks
every live batch for its state and collects the ended ones into the run's completed and
failed files, then submits the batchable prompts no batch holds yet, chunked per (api,
model) within the provider's limits. `--detach` (or Ctrl-C) ends after one pass without
cancelling anything; the next run of the same experiment picks the batches up from the
journal. Retryable per-line errors (5xx, expired lines) go into a follow-up batch, or
online with `batch_fallback="online"`, until `max_attempts` batches have carried the line.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from promptfleet.batch.jobs import (
    BatchAPI,
    BatchJournal,
    BatchState,
    BatchStatus,
    Intent,
    LiveBatch,
    custom_id,
    line_of,
    utcnow,
)
from promptfleet.batch.split import Chunker
from promptfleet.core import scorers
from promptfleet.core.config import Settings
from promptfleet.core.costs import Budget, Spend, cost_of, estimate_tokens, price_of
from promptfleet.core.engine import (
    OUTPUT_KEYS,
    Prompt,
    QueueContext,
    QueueStats,
    RetryPolicy,
    output_of,
    run_queue,
)
from promptfleet.core.experiment import RecordReader
from promptfleet.core.limiter import Pacer
from promptfleet.core.messages import parse_conversation
from promptfleet.core.plan import QueuePlan
from promptfleet.core.rundir import TIMESTAMP_FORMAT, Journal, RunPaths
from promptfleet.core.scorers import Scorer
from promptfleet.providers import Clients, provider_class
from promptfleet.providers.base import Provider, Reply
from promptfleet.providers.errors import ErrorKind, ProviderError, classify

log = logging.getLogger("promptfleet.batch")

FIRST_POLL_S = 5.0
POLL_GROWTH = 1.5
# Errors that mean the create request never took effect; others (timeouts, 5xx) may have created a batch.
_DEFINITE = {ErrorKind.BAD_REQUEST, ErrorKind.AUTH, ErrorKind.NOT_FOUND, ErrorKind.RATE_LIMIT}


def batch_api(api: str, provider: Provider) -> BatchAPI:
    if api in ("openai", "azure-openai"):
        from promptfleet.batch.openai import OpenAIBatches

        return OpenAIBatches(provider, azure=api == "azure-openai")  # type: ignore[arg-type]
    if api == "anthropic":
        from promptfleet.batch.anthropic import AnthropicBatches

        return AnthropicBatches(provider)  # type: ignore[arg-type]
    if api == "gemini":
        from promptfleet.batch.gemini import GeminiBatches

        return GeminiBatches(provider)  # type: ignore[arg-type]
    raise KeyError(f"no batch API for {api!r}")


@dataclass
class BatchContext:
    """What the batch part of a run shares with its online queues."""

    paths: RunPaths
    settings: Settings
    queue: QueuePlan  # the plan's batchable records, by place in the working copy
    reader: RecordReader
    clients: Clients
    journal: Journal
    stats: QueueStats
    skip: bytearray | None = None  # records a previous session already journaled
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    spend: Spend | None = None
    budget: Budget | None = None
    scorers: list[Scorer] = field(default_factory=list)


class BatchRunner:
    def __init__(self, ctx: BatchContext):
        self.ctx = ctx
        self.settings = ctx.settings
        self.journal = BatchJournal(ctx.paths.batches)
        self.ledger = self.journal.load()
        if self.ledger.torn:
            log.warning("%s: %d unreadable record(s) set aside", ctx.paths.batches, self.ledger.torn)
        queue = ctx.queue
        self.index = {line: i for i, line in enumerate(queue.lines)}
        self.done = {queue.lines[i] for i in range(queue.prompts) if ctx.skip and ctx.skip[i]}
        self.statuses: dict[str, BatchStatus] = {}
        self.online: dict[int, int] = {}  # line -> batch attempts, for --batch-fallback online
        self.unsent = False  # a submission failed for a passing reason: try again next pass
        self.may_have_pending = True  # lines no batch holds may exist: worth a scan of the input
        self.committed: dict[str, tuple[float, int]] = {}  # live batch -> worst-case (cost, tokens)
        self.held_back: str | None = None  # why the budget kept a batch back this pass
        self.unreadable: Counter[str] = Counter()  # batch -> failed reads of its results
        self._apis: dict[tuple[str, str], BatchAPI] = {}

    def api_for(self, api: str, model: str) -> BatchAPI:
        if (api, model) not in self._apis:
            self._apis[(api, model)] = batch_api(api, self.ctx.clients.get(api, model))
        return self._apis[(api, model)]

    async def run(self) -> list[dict[str, Any]]:
        """Passes until no batch is live (one pass when detached or stopped); the batches table."""
        stats = self.ctx.stats
        self._commit_live()
        interval = min(FIRST_POLL_S, self.settings.batch_poll)
        try:
            while True:
                await self._reconcile()
                await self._collect()
                if self.may_have_pending and not self.ctx.stop.is_set():
                    await self._submit()
                if self.online and not self.ctx.stop.is_set():
                    await self._send_online()
                open_ = self.ledger.live() or self.ledger.unresolved() or self.unsent
                if not open_ or self.settings.batch_detach or self.ctx.stop.is_set():
                    break
                try:
                    await asyncio.wait_for(self.ctx.stop.wait(), timeout=interval)
                except asyncio.TimeoutError:
                    pass
                interval = min(interval * POLL_GROWTH, self.settings.batch_poll)
            if self.held_back and not stats.budget_stop:
                stats.budget_stop = self.held_back
        finally:
            stats.stopped = self.ctx.stop.is_set()
            stats.finished = time.monotonic()
        if live := self.ledger.live():
            log.info("%d batch(es) still running with %d prompt(s); run the same command again to collect them",
                     len(live), sum(len(b.intent.lines) for b in live))  # fmt: skip
        return self._batches_table()

    @property
    def live(self) -> int:
        return len(self.ledger.live())

    def _commit_live(self) -> None:
        """The worst case of the batches a previous session left running, for the budget."""
        live = {line: batch.batch_id for batch in self.ledger.live() for line in batch.intent.lines}
        for prompt in self._prompts(set(live) - self.done):
            cost, tokens = self.committed.get(live[prompt.line], (0.0, 0))
            worst = self._worst(prompt.record)
            self.committed[live[prompt.line]] = (cost + worst[0], tokens + worst[1])

    def _worst(self, record: dict[str, Any]) -> tuple[float, int]:
        """Worst-case (cost at batch prices, tokens) of a prompt; an unpriced model costs nothing here."""
        ins, outs = estimate_tokens(record)
        price = price_of(record["model_name"], self.ctx.spend.prices) if self.ctx.spend else None
        return (cost_of(price, ins, outs, batch=True) if price else 0.0), ins + outs

    def _over_budget(self, cost: float, tokens: int) -> str | None:
        """A batch cannot be stopped halfway: it goes only if its worst case, plus that of the live
        batches, plus what was spent, stays within --max-cost and --max-tokens-total."""
        budget, spend = self.ctx.budget, self.ctx.spend
        if budget is None or spend is None:
            return None
        cost += spend.cost + sum(c for c, _ in self.committed.values())
        tokens += spend.tokens + sum(t for _, t in self.committed.values())
        if budget.max_cost is not None and cost > budget.max_cost:
            return f"worst case ${cost:.4f} with the next batch would pass --max-cost ${budget.max_cost:g}"
        if budget.max_tokens is not None and tokens > budget.max_tokens:
            return f"worst case {tokens} tokens with the next batch would pass --max-tokens-total {budget.max_tokens}"
        return None

    # -- settle intents a crash left without a batch id ------------------------------------

    async def _reconcile(self) -> None:
        taken = set(self.ledger.submitted.values())
        for intent in self.ledger.unresolved():
            try:
                found = await self.api_for(intent.api, intent.model).find(intent.token, intent.at, len(intent.lines))
            except ProviderError as err:
                log.warning("cannot look up batches of %s/%s yet: %s", intent.api, intent.model, self.ctx.clients.redact(err.message))
                continue
            batch_id = next((b for b in found if b not in taken), None)
            if batch_id:
                log.info("found batch %s submitted before an interruption (%d prompts)", batch_id, len(intent.lines))
                self.journal.submitted(self.ledger, intent.token, batch_id)
                taken.add(batch_id)
            else:
                self.journal.abandoned(self.ledger, intent.token, "not found at the provider")
                self.may_have_pending = True

    # -- poll live batches, collect the ended ones -----------------------------------------

    async def _collect(self) -> None:
        ended: list[tuple[LiveBatch, BatchStatus]] = []
        for batch in self.ledger.live():
            try:
                status = await self.api_for(batch.intent.api, batch.intent.model).status(batch.batch_id)
            except ProviderError as err:
                if err.retryable:
                    log.warning("batch %s: cannot poll yet: %s", batch.batch_id, self.ctx.clients.redact(err.message))
                    continue
                status = BatchStatus(batch.batch_id, BatchState.FAILED, "unknown", message=err.message)
            previous = self.statuses.get(batch.batch_id)
            if previous is None or (previous.provider_state, previous.succeeded) != (status.provider_state, status.succeeded):
                counts = f" {status.succeeded or 0}/{status.total}" if status.total else ""
                log.info("batch %s (%s/%s, %d prompts): %s%s", batch.batch_id, batch.intent.api, batch.intent.model,
                         len(batch.intent.lines), status.provider_state, counts)  # fmt: skip
            self.statuses[batch.batch_id] = status
            if status.state.ended:
                ended.append((batch, status))
        if not ended:
            return
        wanted = {line for batch, _ in ended for line in batch.intent.lines if line not in self.done}
        prompts = {p.line: p for p in self._prompts(wanted)}
        attempts = self.ledger.attempts()
        for batch, status in ended:
            try:
                await self._collect_one(batch, status, prompts, attempts)
            except ProviderError as err:  # results not readable: the batch stays live, the next pass reads again
                message = self.ctx.clients.redact(err.message)
                self.unreadable[batch.batch_id] += 1
                if self.unreadable[batch.batch_id] < self.settings.max_attempts:
                    log.warning("batch %s: cannot read results yet: %s", batch.batch_id, message)
                    continue
                log.warning("batch %s: results unreadable %d times, its unanswered lines go again: %s",
                            batch.batch_id, self.unreadable[batch.batch_id], message)  # fmt: skip
                status = BatchStatus(batch.batch_id, BatchState.FAILED, status.provider_state, message=f"results unreadable: {message}")
                await self._collect_one(batch, status, prompts, attempts)
            self.journal.ended(self.ledger, batch.batch_id, status.state)
            self.committed.pop(batch.batch_id, None)

    async def _collect_one(self, batch: LiveBatch, status: BatchStatus, prompts: dict[int, Prompt], attempts: Counter) -> None:
        api = self.api_for(batch.intent.api, batch.intent.model)
        intent = batch.intent
        asked = {line: intent.keys[n] if intent.keys else None for n, line in enumerate(intent.lines)}
        # an answer counts only for the record it was asked for (the input may have been edited since)
        ours = {line for line, key in asked.items() if line in prompts and key in (None, prompts[line].key)}
        if len(ours) < len(asked) - len(set(asked) & self.done):
            log.warning("batch %s: %d line(s) changed in the input since it was submitted; their answers are not kept",
                        batch.batch_id, len(asked) - len(ours))  # fmt: skip
        seen: set[int] = set()
        if status.state is not BatchState.FAILED:
            async for result in api.results(batch.batch_id, [custom_id(line) for line in intent.lines]):
                line = line_of(result.custom_id)
                if line is None or line not in ours or line in seen:
                    continue
                seen.add(line)
                if line in self.done:
                    continue
                if result.reply is not None:
                    self._answered(prompts[line], result.reply, batch, attempts[line])
                else:
                    self._errored(prompts[line], result.error, batch, attempts[line])  # type: ignore[arg-type]
        missing = _missing(status)
        for line in sorted(ours - seen - self.done):
            self._errored(prompts[line], missing, batch, attempts[line])

    def _answered(self, prompt: Prompt, reply: Reply, batch: LiveBatch, attempts: int) -> None:
        record = prompt.record
        output = output_of(record, [reply])
        done = {**_base(record), **output, **_sent(batch), "attempts": attempts, "input_line": prompt.line, "input_key": prompt.key,
                "batch": batch.batch_id}  # fmt: skip
        if self.ctx.scorers:
            scores = scorers.apply(self.ctx.scorers, done)
            done.update(scores)
            self.ctx.stats.score_keys.update(scores)
        self.ctx.journal.write("completed", done)
        self.done.add(prompt.line)
        self.ctx.stats.answered += 1
        usage = output.get("usage") or {}
        if self.ctx.spend is not None and usage:
            self.ctx.spend.add(record["model_name"], usage.get("input_tokens"), usage.get("output_tokens"), batch=True)
            if self.ctx.budget and (reason := self.ctx.budget.exceeded_by(self.ctx.spend)) and not self.ctx.stats.budget_stop:
                log.warning("budget reached: %s; no new batches are submitted", reason)
                self.ctx.stats.budget_stop = reason

    def _errored(self, prompt: Prompt, error: ProviderError, batch: LiveBatch | None, attempts: int) -> None:
        record = prompt.record
        if error.retryable and attempts < self.settings.max_attempts:
            self.ctx.stats.retries += 1
            self.may_have_pending = True
            if self.settings.batch_fallback == "online":
                self.online[prompt.line] = attempts
            return  # not journaled: the next submission (or the online fallback) takes it
        lines = self.ctx.clients.redact(error.message).splitlines()  # one line, even for pydantic's dump of a malformed line
        message = "; ".join(line.strip() for line in lines if line.strip() and "errors.pydantic.dev" not in line)
        where = f"batch {batch.batch_id}" if batch else "batch submission"
        log.warning("line %d (%s/%s) failed in %s after %d attempt(s): %s", prompt.line, record["api"], record["model_name"], where,
                    attempts, message)  # fmt: skip
        self.ctx.journal.write("failed", {
            **_base(record), "error": {"type": str(error.kind), "status": error.status, "message": message, "attempts": attempts},
            **({"timestamp_sent": _sent(batch)["timestamp_sent"], "batch": batch.batch_id} if batch else {}),
            "input_line": prompt.line, "input_key": prompt.key,
        })  # fmt: skip
        self.done.add(prompt.line)
        self.ctx.stats.failed += 1

    # -- submit what no batch holds ---------------------------------------------------------

    async def _submit(self) -> None:
        self.unsent, self.held_back = False, None
        if self.ctx.stats.budget_stop:
            return
        self.may_have_pending = not await self._submit_all()

    async def _submit_all(self) -> bool:
        """One scan of the input; True when every line no batch holds was submitted (or failed)."""
        held = self.ledger.held_lines()
        attempts = self.ledger.attempts()
        chunkers: dict[tuple[str, str], Chunker] = {}
        limits = (self.settings.batch_max_requests, self.settings.batch_max_bytes)
        for prompt in self._prompts(None):
            line, record = prompt.line, prompt.record
            if line in self.done or line in held or line in self.online:
                continue
            if attempts[line] and self.settings.batch_fallback == "online":
                self.online[line] = attempts[line]  # a retry after a crash: online, as chosen
                continue
            key = (record["api"], record["model_name"])
            try:
                api = self.api_for(*key)
                messages = parse_conversation(record["prompt"], record.get("multimedia")).messages
                item, size = api.encode(custom_id(line), record["model_name"], list(messages), record.get("parameters") or {})
            except Exception as err:  # noqa: BLE001 - a media file swapped after validation, a bad parameter: this line's error
                error = classify(err)
                self._errored(prompt, ProviderError(error.message, kind=error.kind if not error.retryable else ErrorKind.BAD_REQUEST),
                              None, attempts[line])  # fmt: skip
                continue
            chunker = chunkers.setdefault(key, Chunker(api.limits.capped(*limits)))
            if not chunker.fits(size):
                error = ProviderError(f"request of {size} bytes exceeds the batch limit of {chunker.limits.max_bytes} bytes",
                                      kind=ErrorKind.BAD_REQUEST)  # fmt: skip
                self._errored(prompt, error, None, attempts[line])
                continue
            full = chunker.add((prompt, item, self._worst(record)), size)
            if full is not None and not await self._submit_chunk(key, full):
                return False
        for key, chunker in chunkers.items():
            if chunker.items and not await self._submit_chunk(key, chunker.flush()):
                return False
        return True

    async def _submit_chunk(self, key: tuple[str, str], chunk: list[tuple[Prompt, Any, tuple[float, int]]]) -> bool:
        """Journal the intent, create the batch, journal its id. False: stop submitting this pass."""
        if self.ctx.stop.is_set():  # Ctrl-C while submitting: what is not submitted waits for the rerun
            return False
        api, model = key
        worst = (sum(w[0] for _, _, w in chunk), sum(w[1] for _, _, w in chunk))
        if reason := self._over_budget(*worst):
            if reason != self.held_back:
                log.warning("budget: %s; holding back until live batches end", reason)
            self.held_back = reason
            return False
        token = secrets.token_hex(8)
        intent = Intent(token, api, model, tuple(p.line for p, _, _ in chunk), utcnow(), tuple(p.key for p, _, _ in chunk))
        self.journal.intent(self.ledger, intent)
        try:
            batch_id = await self.api_for(api, model).submit(model, [item for _, item, _ in chunk], token)
        except ProviderError as err:
            message = self.ctx.clients.redact(err.message)
            log.warning("%s/%s: submitting a batch of %d failed (%s): %s", api, model, len(chunk), err.kind, message)
            if err.kind in _DEFINITE:  # refused: no batch exists
                self.journal.abandoned(self.ledger, token, message)
            # otherwise the batch may exist: the intent stays open and the next pass looks for it
            if err.retryable:
                self.unsent = True
                return False
            attempts = self.ledger.attempts()
            for prompt, _, _ in chunk:  # refused for good, as a 4xx online: each line fails with the message
                self._errored(prompt, err, None, attempts[prompt.line] + 1)
            return True
        self.journal.submitted(self.ledger, token, batch_id)
        self.committed[batch_id] = worst
        log.info("submitted batch %s: %d prompt(s) to %s/%s", batch_id, len(chunk), api, model)
        return True

    # -- online fallback ----------------------------------------------------------------------

    async def _send_online(self) -> None:
        """Lines whose batch attempts ended in a retryable error, sent online (`--batch-fallback online`)."""
        pending, self.online = self.online, {}
        by_api: dict[str, list[Prompt]] = defaultdict(list)
        for prompt in self._prompts(set(pending) - self.done):
            by_api[prompt.record["api"]].append(prompt)
        for api, group in by_api.items():
            log.info("sending %d prompt(s) of %s online after a failed batch line", len(group), api)
            rate = self.settings.max_queries or provider_class(api).default_rate_per_minute
            left = max(1, self.settings.max_attempts - max(pending[p.line] for p in group))
            ctx = QueueContext(
                self.ctx.clients, Pacer(rate, self.settings.max_in_flight), self.ctx.journal, self.ctx.stats,
                RetryPolicy(max_attempts=left), self.ctx.stop, self.ctx.spend, self.ctx.budget, self.ctx.scorers,
                grace=self.settings.timeout,
            )  # fmt: skip
            await run_queue(group, ctx)
            self.done.update(p.line for p in group)  # answered or failed; a stopped one is picked up on resume

    # -- helpers --------------------------------------------------------------------------------

    def _prompts(self, lines: set[int] | None) -> Iterator[Prompt]:
        """The batchable records (only those of `lines`, when given), read back by their planned place."""
        queue = self.ctx.queue
        indexes = range(queue.prompts) if lines is None else sorted(self.index[line] for line in lines if line in self.index)
        for i in indexes:
            yield Prompt(queue.lines[i], queue.key(i), self.ctx.reader.read(queue.offsets[i], queue.lengths[i]))

    def _batches_table(self) -> list[dict[str, Any]]:
        rows = []
        for batch in self.ledger.batches():
            status = self.statuses.get(batch.batch_id)
            ended = self.ledger.ended.get(batch.batch_id)
            rows.append({
                "batch": batch.batch_id, "api": batch.intent.api, "model": batch.intent.model,
                "prompts": len(batch.intent.lines), "state": ended or (status.provider_state if status else "running"),
            })  # fmt: skip
        return rows


def _base(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in OUTPUT_KEYS}


def _sent(batch: LiveBatch) -> dict[str, Any]:
    at = batch.intent.at
    return {"timestamp_sent": at.astimezone().strftime(TIMESTAMP_FORMAT), "latency_s": round((utcnow() - at).total_seconds(), 3)}


def _missing(status: BatchStatus) -> ProviderError:
    """The error of a line the provider returned no result for; only a cancelled one is final."""
    if status.state is BatchState.EXPIRED:
        return ProviderError("the batch expired before this request ran", kind=ErrorKind.EXPIRED)
    if status.state is BatchState.CANCELLED:
        return ProviderError("the batch was cancelled before this request ran", kind=ErrorKind.CANCELLED)
    if status.state is BatchState.FAILED:
        return ProviderError(f"the batch failed: {status.message or status.provider_state}", kind=ErrorKind.SERVER)
    return ProviderError("the batch returned no result for this request", kind=ErrorKind.INVALID_RESPONSE)
