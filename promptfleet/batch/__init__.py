"""Batch mode: the providers' batch APIs at batch prices (docs/batch.md)."""

from __future__ import annotations

from promptfleet.batch.runner import BatchContext, BatchRunner
from promptfleet.core.engine import QueueStats
from promptfleet.core.run import Run


async def send_batches(run: Run) -> QueueStats:
    """The run's batchable prompts through the providers' batch APIs; its batch queue's stats."""
    queue = run.plan.batch
    assert queue is not None
    stats = run.stats[queue.name]
    ctx = BatchContext(run.paths, run.settings, queue, run.reader, run.clients, run.journal, stats, run.done_marks(queue),
                       run.stop, run.spend, run.budget, run.scorers)  # fmt: skip
    runner = BatchRunner(ctx)
    run.batches = await runner.run()
    run.live_batches = runner.live
    run.stopped_by = run.stopped_by or runner.halted  # a batch the provider cannot answer for: said, never resent
    return stats
