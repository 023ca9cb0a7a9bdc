"""`promptfleet batches list|cancel`: the batches every run of a data folder journaled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from promptfleet.batch.jobs import BatchJournal, LiveBatch
from promptfleet.batch.runner import batch_api
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
    journal: str  # "live", or the state it ended in
    provider_state: str | None = None
    counts: str | None = None


def _journals(data_folder: Path) -> Iterator[tuple[str, str, BatchJournal]]:
    for path in sorted((data_folder / "output").glob("*/*-batches-*.jsonl")):
        stamp, name = path.name[:_STAMP_LEN], path.name[_STAMP_LEN + len("-batches-"):].removesuffix(".jsonl")
        yield name, stamp, BatchJournal(path)


def _batches(data_folder: Path) -> Iterator[tuple[str, str, LiveBatch, str | None]]:
    for name, stamp, journal in _journals(data_folder):
        ledger = journal.load()
        for batch in ledger.batches():
            yield name, stamp, batch, ledger.ended.get(batch.batch_id)


async def list_batches(data_folder: Path, ask: bool = True) -> list[BatchRow]:
    clients = Clients(ProviderOptions(data_folder / "media"))
    rows = []
    try:
        for name, stamp, batch, ended in _batches(data_folder):
            row = BatchRow(name, stamp, batch.batch_id, batch.intent.api, batch.intent.model, len(batch.intent.lines), ended or "live")
            if ask:
                try:
                    status = await batch_api(batch.intent.api, clients.get(batch.intent.api, batch.intent.model)).status(batch.batch_id)
                    row.provider_state = status.provider_state
                    if status.total:
                        row.counts = f"{status.succeeded or 0}/{status.total}" + (f", {status.failed} failed" if status.failed else "")
                except ProviderError as err:
                    row.provider_state = f"? ({clients.redact(err.message)})"
            rows.append(row)
    finally:
        await clients.aclose()
    return rows


async def cancel_batches(data_folder: Path, batch_ids: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Cancel the live batches (or only `batch_ids`); returns (cancelled, problems)."""
    clients = Clients(ProviderOptions(data_folder / "media"))
    cancelled, problems = [], []
    known = set()
    try:
        for _, _, batch, ended in _batches(data_folder):
            known.add(batch.batch_id)
            if ended or (batch_ids is not None and batch.batch_id not in batch_ids):
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
