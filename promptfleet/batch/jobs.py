"""Typed batch records and the protocol every provider's batch API is reached through.

A batch belongs to its run by an identity chosen before the provider hears of it (the
`Intent`): the run's id and a token of its own, carried in the batch's label (OpenAI
metadata, Gemini display name, the name of an uploaded file) and in every request's key
(`custom_id`, Gemini metadata `key`). Anthropic batches carry no label: there the keys
are the identity, read back from a batch's results.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Protocol

from promptfleet.batch.split import Limits
from promptfleet.core.messages import Message
from promptfleet.providers.base import Reply
from promptfleet.providers.errors import ProviderError, classify


class BatchState(str, Enum):
    """A provider's batch states, folded into what the runner acts on."""

    RUNNING = "running"  # validating, queued, in progress, finalizing, cancelling
    COMPLETED = "completed"
    EXPIRED = "expired"  # not done within the provider's window; finished lines are kept
    CANCELLED = "cancelled"
    FAILED = "failed"  # the provider refused the whole batch (e.g. validation); no line ran

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
    label: str | None = None  # our label, where the provider keeps one (OpenAI metadata, Gemini display name)
    created: datetime | None = None

    @property
    def counts(self) -> str | None:
        if not self.total:
            return None
        return f"{self.succeeded or 0}/{self.total}" + (f", {self.failed} failed" if self.failed else "")


@dataclass(frozen=True)
class LineResult:
    """One request's outcome inside a batch: a reply or a classified error."""

    custom_id: str
    reply: Reply | None = None
    error: ProviderError | None = None


def key_prefix(run: str, token: str) -> str:
    """What every request key of a batch begins with: its run's id and its own token."""
    return f"{run}-{token}-" if run else "line-"


@dataclass(frozen=True)
class Intent:
    """A batch as journaled before the provider is called: whose it is and what it holds."""

    token: str
    api: str
    model: str
    lines: tuple[int, ...]
    at: datetime
    keys: tuple[str, ...] = ()  # each line's record key: an answer is kept only for the record it was asked for
    run: str = ""  # the run's id; empty in journals written before runs had one (their keys were `line-N`)
    before: tuple[str, ...] = ()  # batches the provider listed just before the create: not ours (Anthropic)
    worst_usd: float = 0.0  # every answer at its token cap, batch prices

    @property
    def label(self) -> str:
        return f"promptfleet-{self.run}-{self.token}" if self.run else f"promptfleet-{self.token}"

    @property
    def key_prefix(self) -> str:
        return key_prefix(self.run, self.token)

    def custom_id(self, line: int) -> str:
        """A request's key in the batch; Anthropic allows [A-Za-z0-9_-]{1,64} (this is at most 36)."""
        return f"{self.key_prefix}{line}"

    def custom_ids(self) -> dict[str, int]:
        return {self.custom_id(line): line for line in self.lines}


@dataclass(frozen=True)
class LiveBatch:
    batch_id: str
    intent: Intent


@dataclass(frozen=True)
class Found:
    """What the provider holds for an intent whose create went unanswered."""

    batch_id: str | None = None  # the batch carrying the intent's identity
    unverified: tuple[str, ...] = ()  # batches that may be ours but cannot tell until they end (Anthropic)


class BatchAPI(Protocol):
    """One provider's batch protocol, bound to one provider instance (one set of credentials)."""

    limits: Limits
    window: timedelta  # how long the provider may take before the batch expires
    uses_files: bool  # requests go in an uploaded file (OpenAI): files to list and delete

    def encode(self, custom_id: str, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> tuple[Any, int]:
        """The request as the batch carries it, built by the provider's own `request()`, and its size in bytes."""
        ...

    async def before(self) -> tuple[str, ...]:
        """Ids of the batches created lately, read before a create: none of them can be the new one."""
        ...

    async def upload(self, intent: Intent, items: list[Any]) -> str | None:
        """The uploaded file of the requests, named for the intent's label (None: requests go inline)."""
        ...

    async def create(self, intent: Intent, items: list[Any], file_id: str | None) -> str: ...

    async def find(self, intent: Intent) -> Found:
        """The batch created for this intent, if any, matched by its identity alone."""
        ...

    async def status(self, batch_id: str) -> BatchStatus: ...

    def results(self, batch_id: str, custom_ids: list[str]) -> AsyncIterator[LineResult]: ...

    async def cancel(self, batch_id: str) -> None: ...

    async def files_named(self, labels: set[str], since: datetime) -> dict[str, list[str]]:
        """Uploaded files named for these labels since then, by label."""
        ...

    async def delete_file(self, file_id: str) -> None: ...


class InlineBatches:
    """What the protocols whose requests go inline (Anthropic, Gemini) do about files: nothing."""

    uses_files = False

    async def before(self) -> tuple[str, ...]:
        return ()

    async def upload(self, intent: Intent, items: list[Any]) -> str | None:
        return None

    async def files_named(self, labels: set[str], since: datetime) -> dict[str, list[str]]:
        return {}

    async def delete_file(self, file_id: str) -> None:
        return None


@contextmanager
def classified() -> Iterator[None]:
    """Whatever an SDK raises leaves as a ProviderError, classified as online."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - classified, not swallowed
        raise classify(err) from None


CLOCK_SKEW = timedelta(minutes=5)  # between our clock and a provider's, when comparing creation times


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
