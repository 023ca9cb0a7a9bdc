"""`promptfleet batches list|cancel`: the batches every run of a data folder journaled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from promptfleet.batch.jobs import Intent, LiveBatch, utcnow
from promptfleet.batch.journal import BatchJournal, Ledger
from promptfleet.batch.state import batch_api
from promptfleet.providers import Clients
from promptfleet.providers.base import ProviderError, ProviderOptions

_STAMP_LEN = len("25-11-2026-13-03-18")  # rundir.TIMESTAMP_FORMAT


@dataclass
class BatchRow:
    experiment: str
    stamp: str
    batch_id: str
    api: str
    model: str
    prompts: int
    state: str  # as last read: by the run (its journal), or now when the provider was asked
    age: timedelta
    cost: str  # what its answers cost once collected; until then the worst case at batch prices
    live: bool


def _journals(data_folder: Path) -> Iterator[tuple[str, str, BatchJournal]]:
    for path in sorted((data_folder / "output").glob("*/*-batches-*.jsonl")):
        stamp, name = path.name[:_STAMP_LEN], path.name[_STAMP_LEN + len("-batches-"):].removesuffix(".jsonl")
        yield name, stamp, BatchJournal(path)


def _batches(data_folder: Path) -> Iterator[tuple[str, str, Ledger, LiveBatch]]:
    for name, stamp, journal in _journals(data_folder):
        ledger = journal.load()
        for batch in ledger.batches():
            yield name, stamp, ledger, batch


def age_text(age: timedelta) -> str:
    seconds = max(0, int(age.total_seconds()))
    days, hours, minutes = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60
    return f"{days}d {hours}h" if days else f"{hours}h {minutes}m" if hours else f"{minutes}m {seconds % 60}s"


async def list_batches(data_folder: Path, ask: bool = True) -> list[BatchRow]:
    """Every batch, with its state as last read: the provider is asked about the live ones
    unless `ask` is False; one it cannot answer for shows since when it has been unreadable."""
    clients = Clients(ProviderOptions(data_folder / "media"))
    rows = []
    try:
        for name, stamp, journal in _journals(data_folder):
            ledger = journal.load()
            for intent in ledger.intents.values():
                if intent.token not in ledger.abandoned:
                    rows.append(await _row(name, stamp, ledger, intent, clients if ask else None))
    finally:
        await clients.aclose()
    return rows


async def _row(name: str, stamp: str, ledger: Ledger, intent: Intent, clients: Clients | None) -> BatchRow:
    now = utcnow()
    batch_id = ledger.submitted.get(intent.token)
    live = batch_id not in ledger.ended
    state = ledger.state_of(intent.token)
    if clients and batch_id and live:
        try:
            status = await batch_api(intent.api, clients.get(intent.api, intent.model)).status(batch_id)
            state = status.provider_state + (f" {status.counts}" if status.counts else "")
        except ProviderError as err:
            note = ledger.reads.get(batch_id)
            since = note.since if note and note.error and note.since else now
            state = f"unreadable since {since:%Y-%m-%d %H:%M} UTC ({clients.redact(err.message)})"
    cost = f"${ledger.costs[batch_id]:.4f}" if not live else f"<= ${intent.worst_usd:.4f}" if intent.worst_usd else "-"
    return BatchRow(name, stamp, batch_id or "-", intent.api, intent.model, len(intent.lines), state, now - intent.at, cost, live)


async def cancel_batches(data_folder: Path, batch_ids: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Cancel the live batches (or only `batch_ids`); returns (cancelled, problems)."""
    clients = Clients(ProviderOptions(data_folder / "media"))
    cancelled, problems = [], []
    known = set()
    try:
        for _, _, ledger, batch in _batches(data_folder):
            known.add(batch.batch_id)
            if batch.batch_id in ledger.ended or (batch_ids is not None and batch.batch_id not in batch_ids):
                continue
            try:
                await batch_api(batch.intent.api, clients.get(batch.intent.api, batch.intent.model)).cancel(batch.batch_id)
                cancelled.append(batch.batch_id)
            except ProviderError as err:
                problems.append(f"{batch.batch_id}: {clients.redact(err.message)}")
    finally:
        await clients.aclose()
    problems += [f"{b}: no such batch in the journals under {data_folder / 'output'}" for b in batch_ids or [] if b not in known]
    return cancelled, problems
