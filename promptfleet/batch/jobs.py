"""Typed batch records, the protocol every provider's batch API is reached through, and
the batch journal that makes a batch run resumable without a second submission.

The journal (`<stamp>-batches-<name>.jsonl` beside the completed file) is append-only, one
write per record, fsynced. Submitting a batch writes three facts in order:

    intent     token, api, model and the input lines, before the provider hears of it
    submitted  token -> the provider's batch id, as soon as the provider answered
    ended      batch id, once every line of it is in the completed or failed file

A crash between `intent` and `submitted` leaves an unresolved intent. The provider is then
asked whether a batch carrying that token exists (OpenAI metadata, Gemini display name,
Anthropic by creation time and size): found, it is adopted; not found, the intent is
`abandoned` and its lines are free to go again. So no line is ever in two live batches.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from promptfleet.batch.split import Limits
from promptfleet.core.messages import Message
from promptfleet.providers.base import Reply
from promptfleet.providers.errors import ProviderError


class BatchState(str, Enum):
    """A provider's batch states, folded into what the runner acts on."""

    RUNNING = "running"  # validating, queued, in progress, finalizing, cancelling
    COMPLETED = "completed"
    EXPIRED = "expired"  # not done within the provider's window; finished lines are kept
    CANCELLED = "cancelled"
    FAILED = "failed"  # the whole batch was refused (e.g. validation); no line ran

    @property
    def ended(self) -> bool:
        return self is not BatchState.RUNNING


@dataclass(frozen=True)
class BatchStatus:
    batch_id: str
    state: BatchState
    provider_state: str  # the provider's own word, for people
    total: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    message: str | None = None  # why a whole batch failed
    label: str | None = None  # our token, where the provider keeps one (OpenAI metadata, Gemini display name)
    created: datetime | None = None


@dataclass(frozen=True)
class LineResult:
    """One request's outcome inside a batch: a reply or a classified error."""

    custom_id: str
    reply: Reply | None = None
    error: ProviderError | None = None


class BatchAPI(Protocol):
    """One provider's batch protocol, bound to one provider instance (one set of credentials)."""

    limits: Limits

    def encode(self, custom_id: str, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> tuple[Any, int]:
        """The request as the batch carries it, built by the provider's own `request()`, and its size in bytes."""
        ...

    async def submit(self, model: str, items: list[Any], token: str) -> str: ...

    async def status(self, batch_id: str) -> BatchStatus: ...

    def results(self, batch_id: str, custom_ids: list[str]) -> AsyncIterator[LineResult]: ...

    async def cancel(self, batch_id: str) -> None: ...

    async def find(self, token: str, since: datetime, count: int) -> list[str]:
        """Ids of batches that may have been created for this token before a crash lost the answer."""
        ...


_CUSTOM_ID = re.compile(r"^line-(\d+)$")


def custom_id(line: int) -> str:
    """A request's key inside a batch: its input line (Anthropic allows [A-Za-z0-9_-]{1,64})."""
    return f"line-{line}"


def line_of(custom: str) -> int | None:
    match = _CUSTOM_ID.match(custom)
    return int(match.group(1)) if match else None


def label_of(token: str) -> str:
    return f"promptfleet-{token}"


@dataclass(frozen=True)
class Intent:
    token: str
    api: str
    model: str
    lines: tuple[int, ...]
    at: datetime
    keys: tuple[str, ...] = ()  # each line's record key: an answer is kept only for the record it was asked for


@dataclass(frozen=True)
class LiveBatch:
    batch_id: str
    intent: Intent


@dataclass
class Ledger:
    """What the batch journal says: intents, their batch ids, which ended, which were abandoned."""

    intents: dict[str, Intent] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)  # token -> batch id
    ended: dict[str, str] = field(default_factory=dict)  # batch id -> final state
    abandoned: set[str] = field(default_factory=set)
    torn: int = 0  # unreadable lines set aside (a crash mid-write)

    def batches(self) -> Iterator[LiveBatch]:
        for token, batch_id in self.submitted.items():
            yield LiveBatch(batch_id, self.intents[token])

    def live(self) -> list[LiveBatch]:
        return [b for b in self.batches() if b.batch_id not in self.ended]

    def unresolved(self) -> list[Intent]:
        return [i for t, i in self.intents.items() if t not in self.submitted and t not in self.abandoned]

    def held_lines(self) -> set[int]:
        """Lines a live batch (or a batch that may exist) holds: never submitted again meanwhile."""
        held = {line for b in self.live() for line in b.intent.lines}
        return held.union(*(i.lines for i in self.unresolved()))

    def attempts(self) -> Counter[int]:
        """How many submitted batches each line was in."""
        return Counter(line for b in self.batches() for line in b.intent.lines)


class BatchJournal:
    """The append-only batch journal of one run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> Ledger:
        ledger = Ledger()
        if not self.path.exists():
            return ledger
        with self.path.open(encoding="utf-8") as fh:
            for text in fh:
                try:
                    record = json.loads(text)
                    _apply(ledger, record)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    ledger.torn += 1
        return ledger

    def intent(self, ledger: Ledger, intent: Intent) -> None:
        self._write({"event": "intent", "token": intent.token, "api": intent.api, "model": intent.model,
                     "lines": list(intent.lines), "keys": list(intent.keys), "at": intent.at.isoformat()})  # fmt: skip
        ledger.intents[intent.token] = intent

    def submitted(self, ledger: Ledger, token: str, batch_id: str) -> None:
        self._write({"event": "submitted", "token": token, "batch": batch_id})
        ledger.submitted[token] = batch_id

    def abandoned(self, ledger: Ledger, token: str, reason: str) -> None:
        self._write({"event": "abandoned", "token": token, "reason": reason})
        ledger.abandoned.add(token)

    def ended(self, ledger: Ledger, batch_id: str, state: BatchState) -> None:
        self._write({"event": "ended", "batch": batch_id, "state": state.value})
        ledger.ended[batch_id] = state.value

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not _ends_in_newline(self.path):
                data = b"\n" + data  # after a torn record, begin on a fresh line
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)  # a handful of records per batch: each one is worth a sync
        finally:
            os.close(fd)


def _ends_in_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _apply(ledger: Ledger, record: dict[str, Any]) -> None:
    event = record["event"]
    if event == "intent":
        at = datetime.fromisoformat(record["at"])
        ledger.intents[record["token"]] = Intent(record["token"], record["api"], record["model"], tuple(record["lines"]), at,
                                                 tuple(record.get("keys", ())))  # fmt: skip
    elif event == "submitted":
        if record["token"] not in ledger.intents:
            raise KeyError(record["token"])
        ledger.submitted[record["token"]] = record["batch"]
    elif event == "abandoned":
        ledger.abandoned.add(record["token"])
    elif event == "ended":
        ledger.ended[record["batch"]] = record["state"]
    else:
        raise ValueError(event)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
