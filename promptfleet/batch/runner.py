"""Batch mode for one run: reconcile → poll and collect → submit → wait, until no batch is live.

Each pass first settles what the journal left open (intents whose create went unanswered),
then reads every live batch and collects the ended ones into the run's completed and
failed files (collect.py), then submits the batchable prompts no batch holds yet, chunked
per (api, model) within the provider's limits (submit.py). `--detach` (or Ctrl-C) ends
after one pass without cancelling anything; the next run of the same experiment picks the
batches up from the journal.

Only what a provider reported ends a line's batch attempt: a per-line error, or a batch
that failed, expired or was cancelled. Retryable ones go into a follow-up batch (or online
with `batch_fallback="online"`) until `max_attempts` batches have carried the line. A batch
that cannot be read stays ours and is read again; it never costs an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from promptfleet.batch.collect import Collector
from promptfleet.batch.state import BatchContext, BatchRun
from promptfleet.batch.submit import Submitter
from promptfleet.core.engine import Prompt, QueueContext, RetryPolicy, run_queue
from promptfleet.core.limiter import Pacer
from promptfleet.providers import provider_class

log = logging.getLogger("promptfleet.batch")

FIRST_POLL_S = 5.0
POLL_GROWTH = 1.5

__all__ = ["BatchContext", "BatchRunner"]


class BatchRunner:
    def __init__(self, ctx: BatchContext):
        self.batch = BatchRun(ctx)
        self.submitter = Submitter(self.batch)
        self.collector = Collector(self.batch)

    @property
    def live(self) -> int:
        return self.batch.live

    @property
    def halted(self) -> str | None:
        return self.batch.halted

    async def run(self) -> list[dict[str, Any]]:
        """Passes until no batch is live (one pass when detached or stopped); the batches table."""
        b = self.batch
        stats = b.ctx.stats
        b.commit_live()
        interval = min(FIRST_POLL_S, b.settings.batch_poll)
        try:
            await self.submitter.sweep()  # what earlier runs of this experiment uploaded and no batch needs
            while True:
                await self.submitter.reconcile()
                await self.collector.collect()
                if b.may_have_pending and not b.stopping:
                    await self.submitter.submit()
                if b.online and not b.ctx.stop.is_set():
                    await self._send_online()
                if not b.live or b.settings.batch_detach or b.stopping:
                    break
                try:
                    await asyncio.wait_for(b.ctx.stop.wait(), timeout=interval)
                except asyncio.TimeoutError:
                    pass
                interval = min(interval * POLL_GROWTH, b.settings.batch_poll)
            await self.submitter.sweep()
            if b.held_back and not stats.budget_stop:
                stats.budget_stop = b.held_back
        finally:
            stats.stopped = b.ctx.stop.is_set()
            stats.finished = time.monotonic()
        if b.live:
            log.info("%d batch(es) still ours with %d prompt(s); run the same command again to collect them", b.live,
                     sum(len(x.intent.lines) for x in b.ledger.live()) + sum(len(i.lines) for i in b.ledger.unresolved()))  # fmt: skip
        return b.ledger.rows()

    async def _send_online(self) -> None:
        """Lines whose batch attempts ended in a retryable error, sent online (`--batch-fallback online`)."""
        b = self.batch
        pending, b.online = b.online, {}
        by_api: dict[str, list[Prompt]] = defaultdict(list)
        for prompt in b.prompts(set(pending) - b.done):
            by_api[prompt.record["api"]].append(prompt)
        for api, group in by_api.items():
            log.info("sending %d prompt(s) of %s online after a failed batch line", len(group), api)
            rate = b.settings.max_queries or provider_class(api).default_rate_per_minute
            left = max(1, b.settings.max_attempts - max(pending[p.line] for p in group))
            ctx = QueueContext(
                b.ctx.clients, Pacer(rate, b.settings.max_in_flight), b.ctx.journal, b.ctx.stats, RetryPolicy(max_attempts=left),
                b.ctx.stop, b.ctx.spend, b.ctx.budget, b.ctx.scorers, grace=b.settings.timeout,
            )  # fmt: skip
            await run_queue(group, ctx)
            b.done.update(p.line for p in group)  # answered or failed; a stopped one is picked up on resume
