"""Anthropic's Message Batches: the requests go inline (`custom_id` + the Messages API body
as `params`), results come back as JSONL from the batch's `results_url`.

Limits: 100,000 requests or 256 MB per batch. A batch carries no metadata, so a batch lost
to a crash between its creation and the journal is recognised by its creation time and size.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from promptfleet.batch.jobs import BatchState, BatchStatus, LineResult
from promptfleet.batch.split import Limits
from promptfleet.core.messages import Message
from promptfleet.providers.anthropic import AnthropicProvider, reply_of
from promptfleet.providers.errors import ErrorKind, ProviderError, classify

LIMITS = Limits(max_requests=100_000, max_bytes=256 * 1024 * 1024)
_RETRYABLE_ERRORS = {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}
CLOCK_SKEW = timedelta(minutes=5)


class AnthropicBatches:
    limits = LIMITS

    def __init__(self, provider: AnthropicProvider):
        self._provider = provider
        self._client = provider.client

    def encode(self, custom_id: str, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> tuple[dict, int]:
        item = {"custom_id": custom_id, "params": self._provider.request(model, messages, parameters)}
        return item, len(json.dumps(item, ensure_ascii=False).encode()) + 1

    async def submit(self, model: str, items: list[dict], token: str) -> str:
        try:
            batch = await self._client.messages.batches.create(requests=items)  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - classified, as online
            raise classify(err) from None
        return batch.id

    async def status(self, batch_id: str) -> BatchStatus:
        try:
            batch = await self._client.messages.batches.retrieve(batch_id)
        except Exception as err:  # noqa: BLE001 - classified, as online
            raise classify(err) from None
        return _status(batch)

    async def results(self, batch_id: str, custom_ids: list[str]) -> AsyncIterator[LineResult]:
        try:
            async for item in await self._client.messages.batches.results(batch_id):
                yield _line_result(item)
        except Exception as err:  # noqa: BLE001 - classified, as online
            raise classify(err) from None

    async def cancel(self, batch_id: str) -> None:
        try:
            await self._client.messages.batches.cancel(batch_id)
        except Exception as err:  # noqa: BLE001 - classified, as online
            raise classify(err) from None

    async def find(self, token: str, since: datetime, count: int) -> list[str]:
        """Batches of exactly `count` requests created since the intent was journaled, newest first."""
        found = []
        try:
            async for batch in self._client.messages.batches.list(limit=100):
                status = _status(batch)
                if status.created and status.created < since - CLOCK_SKEW:
                    break  # listed newest first: nothing older can be ours
                if status.total == count:
                    found.append(status.batch_id)
        except Exception as err:  # noqa: BLE001 - classified, as online
            raise classify(err) from None
        return found


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
