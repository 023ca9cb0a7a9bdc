"""Gemini batch mode (Gemini Developer API): `batchGenerateContent` with inlined requests,
each the same (contents, config) pair the online path sends, keyed by metadata; results
come back inline on the batch job.

Google documents inline batches for a total request under 20 MB and an uploaded JSONL
file beyond. Here a larger job becomes several inline batches instead of one uploaded file:
the file lines would need the REST form of each request, which the SDK builds only
privately, and a second serialisation of our own could drift from the online one.
Vertex AI batch prediction needs a GCS bucket or BigQuery table (see docs/batch.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

from google.genai import types

from promptfleet.batch.jobs import BatchState, BatchStatus, Found, InlineBatches, Intent, LineResult, classified
from promptfleet.batch.split import Limits
from promptfleet.core.messages import Message
from promptfleet.providers.errors import ErrorKind, ProviderError
from promptfleet.providers.gemini import GeminiProvider, reply_of

# The request count has no documented cap; the 20 MB applies to the whole create request.
LIMITS = Limits(max_requests=100_000, max_bytes=19 * 1024 * 1024)
_KEY = "key"
FIND_LIMIT = 1000
_STATES = {
    types.JobState.JOB_STATE_SUCCEEDED: BatchState.COMPLETED,
    types.JobState.JOB_STATE_PARTIALLY_SUCCEEDED: BatchState.COMPLETED,
    types.JobState.JOB_STATE_FAILED: BatchState.FAILED,
    types.JobState.JOB_STATE_CANCELLED: BatchState.CANCELLED,
    types.JobState.JOB_STATE_EXPIRED: BatchState.EXPIRED,
}
# google.rpc codes worth another try: CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE
_RETRYABLE_CODES = {1, 2, 4, 8, 10, 13, 14}


class GeminiBatches(InlineBatches):
    limits = LIMITS
    window = timedelta(hours=48)  # a job pending or running longer expires

    def __init__(self, provider: GeminiProvider):
        self._provider = provider
        self._client = provider.client

    def encode(self, custom_id: str, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> tuple[types.InlinedRequest, int]:
        with classified():  # an invalid parameter or media file is this line's error, as online
            contents, config = self._provider.request(model, messages, parameters)
        item = types.InlinedRequest(contents=contents, config=config, metadata={_KEY: custom_id})
        return item, len(item.model_dump_json(exclude_none=True))

    async def create(self, intent: Intent, items: list[types.InlinedRequest], file_id: str | None) -> str:
        with classified():
            job = await self._client.aio.batches.create(model=intent.model, src=items, config={"display_name": intent.label})
        if not job.name:
            raise ProviderError("batch created without a name", kind=ErrorKind.INVALID_RESPONSE)
        return job.name

    async def status(self, batch_id: str) -> BatchStatus:
        with classified():
            return _status(await self._client.aio.batches.get(name=batch_id))

    async def results(self, batch_id: str, custom_ids: list[str]) -> AsyncIterator[LineResult]:
        with classified():
            job = await self._client.aio.batches.get(name=batch_id)
        responses = (job.dest.inlined_responses if job.dest else None) or []
        for n, item in enumerate(responses):
            key = (item.metadata or {}).get(_KEY) or (custom_ids[n] if n < len(custom_ids) else "")
            if item.error is not None:
                code, message = item.error.code, item.error.message or "error"
                kind = ErrorKind.SERVER if code in _RETRYABLE_CODES else ErrorKind.BAD_REQUEST
                yield LineResult(key, error=ProviderError(f"{code}: {message}", kind=kind))
            elif item.response is not None:
                try:
                    yield LineResult(key, reply=reply_of(item.response))
                except ProviderError as err:
                    yield LineResult(key, error=err)

    async def cancel(self, batch_id: str) -> None:
        with classified():
            await self._client.aio.batches.cancel(name=batch_id)

    async def find(self, intent: Intent) -> Found:
        """The job whose display name is the intent's label, among the most recent FIND_LIMIT (the listing order is not documented)."""
        with classified():
            seen = 0
            async for job in await self._client.aio.batches.list(config={"page_size": 100}):
                if job.display_name == intent.label and job.name:
                    return Found(job.name)
                seen += 1
                if seen >= FIND_LIMIT:
                    break
        return Found()


def _status(job: types.BatchJob) -> BatchStatus:
    state = _STATES.get(job.state, BatchState.RUNNING) if job.state else BatchState.RUNNING
    return BatchStatus(
        batch_id=job.name or "", state=state, provider_state=job.state.value if job.state else "unknown",
        message=job.error.message if job.error else None, label=job.display_name, created=job.create_time,
    )  # fmt: skip
