"""Reading the live batches and collecting the ended ones into the run's completed and failed files.

Only what the provider reported moves a line: its own result, or the end of a batch that
failed, expired or was cancelled. A batch that cannot be read (an error on its status or on
its results, a 404 included: the APIs are eventually consistent) stays ours and pending:
it is read again at every pass, the passes backing off to --batch-poll, for as long as its
completion window allows; past it, the run stops, naming the batch, and the same command
reads it later. An unreadable batch never costs a line an attempt.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import promptfleet.batch.jobs as jobs  # the clock, read through the module: the tests' fake clock
from promptfleet.batch.jobs import BatchState, BatchStatus, LiveBatch
from promptfleet.batch.journal import ReadNote
from promptfleet.core.engine import Prompt
from promptfleet.providers.errors import ErrorKind, ProviderError

if TYPE_CHECKING:
    from promptfleet.batch.state import BatchRun

log = logging.getLogger("promptfleet.batch")

MIN_READS = 3  # failed reads in one run before a batch past its window stops the run


@dataclass
class Unreadable:
    since: datetime
    reads: int = 0


class Collector:
    def __init__(self, run: BatchRun):
        self.run = run
        self.unreadable: dict[str, Unreadable] = {}
        self.cost: Counter[str] = Counter()  # batch -> what its answers collected in this run cost

    async def collect(self) -> None:
        r = self.run
        ended: list[tuple[LiveBatch, BatchStatus]] = []
        for batch in r.ledger.live():
            try:
                status = await r.api_for(batch.intent.api, batch.intent.model).status(batch.batch_id)
            except ProviderError as err:
                self._unreadable(batch, err, "status")
                continue
            if status.state.ended:
                ended.append((batch, status))  # readable once its results are
            else:
                self._readable(batch, status)
        if not ended:
            return
        wanted = {line for batch, _ in ended for line in batch.intent.lines if line not in r.done}
        prompts = {p.line: p for p in r.prompts(wanted)}
        attempts = r.ledger.attempts()
        for batch, status in ended:
            try:
                await self._collect_one(batch, status, prompts, attempts)
            except ProviderError as err:  # what landed is journaled; the rest is read again
                self._unreadable(batch, err, "results")
                continue
            self._readable(batch, status)
            r.journal.ended(r.ledger, batch.batch_id, status.state, self.cost[batch.batch_id])
            r.committed.pop(batch.batch_id, None)

    async def _collect_one(self, batch: LiveBatch, status: BatchStatus, prompts: dict[int, Prompt], attempts: Counter) -> None:
        r = self.run
        intent = batch.intent
        keys = intent.custom_ids()
        asked = {line: intent.keys[n] if intent.keys else None for n, line in enumerate(intent.lines)}
        # an answer counts only for the record it was asked for (the input may have been edited since)
        ours = {line for line, key in asked.items() if line in prompts and key in (None, prompts[line].key)}
        if len(ours) < len(asked) - len(set(asked) & r.done):
            log.warning("batch %s: %d line(s) changed in the input since it was submitted; their answers are not kept",
                        batch.batch_id, len(asked) - len(ours))  # fmt: skip
        seen: set[int] = set()
        foreign = 0
        if status.state is not BatchState.FAILED:
            api = r.api_for(intent.api, intent.model)
            async for result in api.results(batch.batch_id, list(keys)):
                line = keys.get(result.custom_id)
                if line is None:
                    foreign += 1
                    continue
                if line not in ours or line in seen:
                    continue
                seen.add(line)
                if line in r.done:
                    continue
                if result.reply is not None:
                    self.cost[batch.batch_id] += r.answered(prompts[line], result.reply, batch, attempts[line])
                else:
                    r.errored(prompts[line], result.error, batch, attempts[line])  # type: ignore[arg-type]
        if foreign:
            log.warning("batch %s: %d result(s) under keys it was not given are ignored", batch.batch_id, foreign)
        missing = _missing(status)
        for line in sorted(ours - seen - r.done):
            r.errored(prompts[line], missing, batch, attempts[line])

    def _readable(self, batch: LiveBatch, status: BatchStatus) -> None:
        r = self.run
        if self.unreadable.pop(batch.batch_id, None):
            log.info("batch %s: readable again", batch.batch_id)
        note = r.ledger.reads.get(batch.batch_id)
        if note is None or note.error or (note.state, note.counts) != (status.provider_state, status.counts):
            log.info("batch %s (%s/%s, %d prompts): %s%s", batch.batch_id, batch.intent.api, batch.intent.model, len(batch.intent.lines),
                     status.provider_state, f" {status.counts}" if status.counts else "")  # fmt: skip
            r.journal.read(r.ledger, batch.batch_id, ReadNote(jobs.utcnow(), status.provider_state, status.counts))

    def _unreadable(self, batch: LiveBatch, err: ProviderError, what: str) -> None:
        r = self.run
        now = jobs.utcnow()
        message = f"{what}: {r.redact(err)}"
        note = r.ledger.reads.get(batch.batch_id)
        state = self.unreadable.get(batch.batch_id)
        if state is None:  # unreadable since an earlier run, or since now
            state = self.unreadable[batch.batch_id] = Unreadable(note.since if note and note.error and note.since else now)
            log.warning("batch %s: cannot read its %s (%s); it stays ours and is read again", batch.batch_id, what, r.redact(err))
        state.reads += 1
        if note is None or note.error != message:
            r.journal.read(r.ledger, batch.batch_id, ReadNote(now, note.state if note else None, note.counts if note else None, message,
                                                              state.since))  # fmt: skip
        window = r.api_for(batch.intent.api, batch.intent.model).window
        if state.reads >= MIN_READS and now > batch.intent.at + window:
            r.halt(f"batch {batch.batch_id} ({batch.intent.api}/{batch.intent.model}, {len(batch.intent.lines)} prompt(s)) unreadable "
                   f"since {state.since:%Y-%m-%d %H:%M} UTC ({message}), past its {window} window; it stays ours, its prompts are not "
                   "sent again: the same command reads it later")  # fmt: skip


def _missing(status: BatchStatus) -> ProviderError:
    """The error of a line an ended batch returned no result for; only a cancelled one is final."""
    if status.state is BatchState.EXPIRED:
        return ProviderError("the batch expired before this request ran", kind=ErrorKind.EXPIRED)
    if status.state is BatchState.CANCELLED:
        return ProviderError("the batch was cancelled before this request ran", kind=ErrorKind.CANCELLED)
    if status.state is BatchState.FAILED:
        return ProviderError(f"the batch failed: {status.message or status.provider_state}", kind=ErrorKind.SERVER)
    return ProviderError("the batch returned no result for this request", kind=ErrorKind.INVALID_RESPONSE)
