"""Anthropic's Message Batches: the requests go inline (`custom_id` + the Messages API body
as `params`), results come back as JSONL from the batch's `results_url`.

Limits: 100,000 requests or 256 MB per batch. A batch carries no label, so when a create
went unanswered, the batch it may have made is known only by its requests' keys, which
carry the run's id and the batch's token. Those are readable once the batch has ended:
until then a candidate stays unverified, and its lines wait. Candidates are few: a batch
the provider listed just before the create, or of another size, cannot be ours.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

from promptfleet.batch.jobs import CLOCK_SKEW, BatchState, BatchStatus, Found, InlineBatches, Intent, LineResult, classified, utcnow
from promptfleet.batch.split import Limits
from promptfleet.core.messages import Message
from promptfleet.providers.anthropic import AnthropicProvider, reply_of
from promptfleet.providers.errors import ErrorKind, ProviderError

LIMITS = Limits(max_requests=100_000, max_bytes=256 * 1024 * 1024)
_RETRYABLE_ERRORS = {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}
BEFORE_LIMIT = 100  # batches created in the last minutes, remembered with an intent


class AnthropicBatches(InlineBatches):
    limits = LIMITS
    window = timedelta(hours=24)

    def __init__(self, provider: AnthropicProvider):
        self._provider = provider
        self._client = provider.client

    def encode(self, custom_id: str, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> tuple[dict, int]:
        item = {"custom_id": custom_id, "params": self._provider.request(model, messages, parameters)}
        return item, len(json.dumps(item, ensure_ascii=False).encode()) + 1

    async def before(self) -> tuple[str, ...]:
        ids: list[str] = []
        since = utcnow() - CLOCK_SKEW
        with classified():
            async for batch in self._client.messages.batches.list(limit=BEFORE_LIMIT):
                if batch.created_at < since or len(ids) >= BEFORE_LIMIT:
                    break  # listed newest first
                ids.append(batch.id)
        return tuple(ids)

    async def create(self, intent: Intent, items: list[dict], file_id: str | None) -> str:
        with classified():
            batch = await self._client.messages.batches.create(requests=items)  # type: ignore[arg-type]
        return batch.id

    async def find(self, intent: Intent) -> Found:
        """The ended batch whose results carry the intent's keys; newer ones of its size that
        have not ended are unverified."""
        unverified: list[str] = []
        with classified():
            async for batch in self._client.messages.batches.list(limit=100):
                if batch.created_at < intent.at - CLOCK_SKEW:
                    break  # listed newest first: nothing older can be ours
                if batch.id in intent.before or _status(batch).total != len(intent.lines):
                    continue
                holds = await self._holds(batch.id, intent.key_prefix) if batch.processing_status == "ended" else None
                if holds:
                    return Found(batch.id)
                if holds is None:
                    unverified.append(batch.id)
        return Found(unverified=tuple(unverified))

    async def _holds(self, batch_id: str, key_prefix: str) -> bool | None:
        """Whether the batch's requests carry our keys (one batch, one token: the first says); None: unreadable."""
        try:
            with classified():
                stream = await self._client.messages.batches.results(batch_id)
                try:
                    async for item in stream:
                        return item.custom_id.startswith(key_prefix)
                finally:
                    await stream.close()  # one line read: the rest of a foreign batch stays unread
        except ProviderError:
            return None
        return False

    async def status(self, batch_id: str) -> BatchStatus:
        with classified():
            return _status(await self._client.messages.batches.retrieve(batch_id))

    async def results(self, batch_id: str, custom_ids: list[str]) -> AsyncIterator[LineResult]:
        with classified():
            async for item in await self._client.messages.batches.results(batch_id):
                yield _line_result(item)

    async def cancel(self, batch_id: str) -> None:
        with classified():
            await self._client.messages.batches.cancel(batch_id)


def _status(batch: Any) -> BatchStatus:
    counts = batch.request_counts
    state = BatchState.RUNNING
    if batch.processing_status == "ended":  # the per-line results say which expired or were cancelled
        state = BatchState.CANCELLED if batch.cancel_initiated_at else BatchState.COMPLETED
        if counts.expired and not batch.cancel_initiated_at:
            state = BatchState.EXPIRED
    total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
    return BatchStatus(
        batch_id=batch.id, state=state, provider_state=batch.processing_status, total=total,
        succeeded=counts.succeeded, failed=counts.errored + counts.canceled + counts.expired, created=batch.created_at,
    )  # fmt: skip


def _line_result(item: Any) -> LineResult:
    result = item.result
    if result.type == "succeeded":
        try:
            return LineResult(item.custom_id, reply=reply_of(result.message))
        except ProviderError as err:
            return LineResult(item.custom_id, error=err)
    if result.type == "errored":
        error = result.error.error
        kind = ErrorKind.SERVER if error.type in _RETRYABLE_ERRORS else ErrorKind.BAD_REQUEST
        if error.type in ("authentication_error", "permission_error"):
            kind = ErrorKind.AUTH
        return LineResult(item.custom_id, error=ProviderError(f"{error.type}: {error.message}", kind=kind))
    if result.type == "expired":
        return LineResult(item.custom_id, error=ProviderError("the batch expired before this request ran", kind=ErrorKind.EXPIRED))
    return LineResult(item.custom_id, error=ProviderError("the batch was cancelled before this request ran", kind=ErrorKind.CANCELLED))
