"""The batch side of one run, shared by submission (submit.py) and collection (collect.py):
its journal and ledger, its run id, the provider clients, what is done and held, and the
one place each line ends (answered, failed, or free to go again)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from promptfleet.batch.jobs import BatchAPI, LiveBatch, utcnow
from promptfleet.batch.journal import BatchJournal
from promptfleet.core import scorers
from promptfleet.core.config import Settings
from promptfleet.core.costs import Budget, Spend, estimate_tokens
from promptfleet.core.engine import OUTPUT_KEYS, Prompt, QueueStats, output_of
from promptfleet.core.experiment import RecordReader
from promptfleet.core.plan import QueuePlan
from promptfleet.core.rundir import TIMESTAMP_FORMAT, Journal, RunPaths
from promptfleet.core.scorers import Scorer
from promptfleet.providers import Clients
from promptfleet.providers.base import Provider, Reply
from promptfleet.providers.errors import ProviderError

log = logging.getLogger("promptfleet.batch")


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


class BatchRun:
    def __init__(self, ctx: BatchContext):
        self.ctx = ctx
        self.settings = ctx.settings
        self.journal = BatchJournal(ctx.paths.batches)
        self.ledger = self.journal.load()
        if self.ledger.torn:
            log.warning("%s: %d unreadable record(s) set aside", ctx.paths.batches, self.ledger.torn)
        self.run_id = self.ledger.run or secrets.token_hex(5)  # in every batch's label and request keys
        queue = ctx.queue
        self.index = {line: i for i, line in enumerate(queue.lines)}
        self.done = {queue.lines[i] for i in range(queue.prompts) if ctx.skip and ctx.skip[i]}
        self.online: dict[int, int] = {}  # line -> batch attempts, for --batch-fallback online
        self.may_have_pending = True  # lines no batch holds may exist: worth a scan of the input
        self.committed: dict[str, tuple[float, int]] = {}  # live batch -> worst-case (cost, tokens)
        self.held_back: str | None = None  # why the budget kept a batch back this pass
        self.halted: str | None = None  # why this run stops short: the same command goes on from the journal
        self._apis: dict[tuple[str, str], BatchAPI] = {}

    def api_for(self, api: str, model: str) -> BatchAPI:
        if (api, model) not in self._apis:
            self._apis[(api, model)] = batch_api(api, self.ctx.clients.get(api, model))
        return self._apis[(api, model)]

    def redact(self, err: ProviderError) -> str:
        return self.ctx.clients.redact(err.message)

    def halt(self, reason: str) -> None:
        """Stop this run after the pass, with one line that says why; nothing is lost or resent."""
        if self.halted is None:
            self.halted = reason
            log.warning("%s", reason)

    @property
    def stopping(self) -> bool:
        return self.ctx.stop.is_set() or self.halted is not None

    @property
    def live(self) -> int:
        """Batches still ours at the provider, counting those whose create may have made one."""
        return len(self.ledger.live()) + len(self.ledger.unresolved())

    def commit_live(self) -> None:
        """The worst case of the batches a previous session left running, for the budget."""
        live = {line: batch.batch_id for batch in self.ledger.live() for line in batch.intent.lines}
        for prompt in self.prompts(set(live) - self.done):
            cost, tokens = self.committed.get(live[prompt.line], (0.0, 0))
            worst = self.worst(prompt.record)
            self.committed[live[prompt.line]] = (cost + worst[0], tokens + worst[1])

    def worst(self, record: dict[str, Any]) -> tuple[float, int]:
        """Worst-case (cost at batch prices, tokens) of a prompt; an unpriced model costs nothing here."""
        ins, outs = estimate_tokens(record)
        cost = self.ctx.spend.cost_of(record["model_name"], ins, outs, batch=True, api=record["api"]) if self.ctx.spend else None
        return cost or 0.0, ins + outs

    # -- where each line ends ---------------------------------------------------------------

    def answered(self, prompt: Prompt, reply: Reply, batch: LiveBatch, attempts: int) -> float:
        """Journal the answer; what it cost at batch prices."""
        record, spend = prompt.record, self.ctx.spend
        output = output_of(record, [reply], spend, batch=True)
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
        if spend is None or not usage:
            return 0.0
        spend.add(record["model_name"], usage.get("input_tokens"), usage.get("output_tokens"), batch=True, api=record["api"],
                  reasoning_tokens=usage.get("reasoning_tokens"))  # fmt: skip
        if self.ctx.budget and (reason := self.ctx.budget.exceeded_by(spend)) and not self.ctx.stats.budget_stop:
            log.warning("budget reached: %s; no new batches are submitted", reason)
            self.ctx.stats.budget_stop = reason
        return usage.get("cost_usd") or 0.0

    def errored(self, prompt: Prompt, error: ProviderError, batch: LiveBatch | None, attempts: int) -> None:
        record = prompt.record
        if error.retryable and attempts < self.settings.max_attempts:
            self.ctx.stats.retries += 1
            self.may_have_pending = True
            if self.settings.batch_fallback == "online":
                self.online[prompt.line] = attempts
            return  # not journaled: the next submission (or the online fallback) takes it
        lines = self.redact(error).splitlines()  # one line, even for pydantic's dump of a malformed line
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

    def prompts(self, lines: set[int] | None) -> Iterator[Prompt]:
        """The batchable records (only those of `lines`, when given), read back by their planned place."""
        queue = self.ctx.queue
        indexes = range(queue.prompts) if lines is None else sorted(self.index[line] for line in lines if line in self.index)
        for i in indexes:
            yield Prompt(queue.lines[i], queue.key(i), self.ctx.reader.read(queue.offsets[i], queue.lengths[i]))



def _base(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in OUTPUT_KEYS}


def _sent(batch: LiveBatch) -> dict[str, Any]:
    at = batch.intent.at
    return {"timestamp_sent": at.astimezone().strftime(TIMESTAMP_FORMAT), "latency_s": round((utcnow() - at).total_seconds(), 3)}
