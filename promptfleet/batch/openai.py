"""OpenAI's Batch API (also Azure OpenAI global batch, and any OpenAI-compatible server with
`/v1/files` + `/v1/batches`): a JSONL file of chat-completion requests is uploaded with
purpose `batch`, a batch is created on it, and its output and error files are read back.

Limits (OpenAI): 50,000 requests and 200 MB per input file. Azure global batch: 100,000
requests, 200 MB. Azure's line `url` is `/chat/completions` and `model` is the deployment.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from openai.types.chat import ChatCompletion

from promptfleet.batch.jobs import CLOCK_SKEW, BatchState, BatchStatus, Found, Intent, LineResult, classified
from promptfleet.batch.split import Limits
from promptfleet.core.messages import Message
from promptfleet.providers.errors import ErrorKind, ProviderError, error_for_status
from promptfleet.providers.openai import OpenAIProvider, reply_of

OPENAI_LIMITS = Limits(max_requests=50_000, max_bytes=200 * 1024 * 1024)
AZURE_LIMITS = Limits(max_requests=100_000, max_bytes=200 * 1024 * 1024)

_STATES = {
    "completed": BatchState.COMPLETED,
    "expired": BatchState.EXPIRED,
    "cancelled": BatchState.CANCELLED,
    "failed": BatchState.FAILED,
}
_LABEL_KEY = "promptfleet"


class OpenAIBatches:
    window = timedelta(hours=24)
    uses_files = True

    def __init__(self, provider: OpenAIProvider, azure: bool = False):
        self._provider = provider
        self._client = provider.client
        self._endpoint = "/chat/completions" if azure else "/v1/chat/completions"
        self.limits = AZURE_LIMITS if azure else OPENAI_LIMITS

    def encode(self, custom_id: str, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> tuple[bytes, int]:
        line = {"custom_id": custom_id, "method": "POST", "url": self._endpoint,
                "body": self._provider.request(model, messages, parameters)}  # fmt: skip
        data = json.dumps(line, ensure_ascii=False).encode() + b"\n"
        return data, len(data)

    async def before(self) -> tuple[str, ...]:
        return ()  # a batch carries its label in its metadata

    async def upload(self, intent: Intent, items: list[bytes]) -> str:
        with classified():
            upload = await self._client.files.create(file=(f"{intent.label}.jsonl", b"".join(items)), purpose="batch")
        return upload.id

    async def create(self, intent: Intent, items: list[bytes], file_id: str | None) -> str:
        with classified():
            batch = await self._client.batches.create(
                input_file_id=file_id or "", endpoint=self._endpoint, completion_window="24h",  # type: ignore[arg-type]
                metadata={_LABEL_KEY: intent.label},
            )  # fmt: skip
        return batch.id

    async def find(self, intent: Intent) -> Found:
        """The batch labelled for the intent, from the newest back to the intent's time."""
        with classified():
            async for batch in self._client.batches.list(limit=100):
                status = _status(batch)
                if status.created and status.created < intent.at - CLOCK_SKEW:
                    break  # listed newest first: nothing older can be ours
                if status.label == intent.label:
                    return Found(status.batch_id)
        return Found()

    async def status(self, batch_id: str) -> BatchStatus:
        with classified():
            return _status(await self._client.batches.retrieve(batch_id))

    async def results(self, batch_id: str, custom_ids: list[str]) -> AsyncIterator[LineResult]:
        with classified():
            batch = await self._client.batches.retrieve(batch_id)
            for file_id in (batch.output_file_id, batch.error_file_id):
                if not file_id:
                    continue
                async with self._client.files.with_streaming_response.content(file_id) as response:
                    async for text in response.iter_lines():
                        if text.strip():
                            yield _line_result(json.loads(text))

    async def cancel(self, batch_id: str) -> None:
        with classified():
            await self._client.batches.cancel(batch_id)

    async def files_named(self, labels: set[str], since: datetime) -> dict[str, list[str]]:
        found: dict[str, list[str]] = defaultdict(list)
        with classified():
            async for file in self._client.files.list(purpose="batch", order="desc", limit=100):
                if datetime.fromtimestamp(file.created_at, timezone.utc) < since - CLOCK_SKEW:
                    break
                if (label := file.filename.removesuffix(".jsonl")) in labels:
                    found[label].append(file.id)
        return found

    async def delete_file(self, file_id: str) -> None:
        try:
            with classified():
                await self._client.files.delete(file_id)
        except ProviderError as err:
            if err.kind is not ErrorKind.NOT_FOUND:  # already gone is as good as deleted
                raise


def _status(batch: Any) -> BatchStatus:
    counts = batch.request_counts
    errors = [e.message for e in (batch.errors.data if batch.errors and batch.errors.data else []) if e.message]
    return BatchStatus(
        batch_id=batch.id,
        state=_STATES.get(batch.status, BatchState.RUNNING),
        provider_state=batch.status,
        total=counts.total if counts else None,
        succeeded=counts.completed if counts else None,
        failed=counts.failed if counts else None,
        message="; ".join(errors) or None,
        label=(batch.metadata or {}).get(_LABEL_KEY),
        created=datetime.fromtimestamp(batch.created_at, timezone.utc),
    )


def _line_result(line: dict[str, Any]) -> LineResult:
    """One line of an output or error file: a response with its status, or a batch-level error."""
    custom = str(line.get("custom_id"))
    response, error = line.get("response"), line.get("error")
    if response and response.get("status_code") == 200:
        try:
            return LineResult(custom, reply=reply_of(ChatCompletion.model_validate(response["body"])))
        except ProviderError as err:
            return LineResult(custom, error=err)
        except (ValueError, KeyError, TypeError) as err:
            return LineResult(custom, error=ProviderError(f"malformed response: {err}", kind=ErrorKind.INVALID_RESPONSE))
    if response:
        body = response.get("body") or {}
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        return LineResult(custom, error=error_for_status(int(response.get("status_code") or 500), message or str(body)))
    code = (error or {}).get("code")
    message = (error or {}).get("message") or "no response"
    if code == "batch_expired":
        return LineResult(custom, error=ProviderError(message, kind=ErrorKind.EXPIRED))
    if code == "batch_cancelled":
        return LineResult(custom, error=ProviderError(message, kind=ErrorKind.CANCELLED))
    return LineResult(custom, error=ProviderError(f"{code}: {message}" if code else message, kind=ErrorKind.BAD_REQUEST))
