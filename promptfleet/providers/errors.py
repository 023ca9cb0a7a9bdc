"""One error taxonomy, and one place that maps every failure onto it.

Providers raise whatever their SDK raises; `classify` turns status codes, httpx/httpx2
errors, aiohttp's, the openai/anthropic/google-genai exceptions and our own media errors into a
`ProviderError` whose kind alone decides whether the engine retries. SDKs are looked up
in `sys.modules`, so classifying never imports one that the run does not use.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from enum import StrEnum

from promptfleet.core.media import MediaError


class ErrorKind(StrEnum):
    RATE_LIMIT = "rate_limit"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    SERVER = "server"
    CONFLICT = "conflict"
    INVALID_RESPONSE = "invalid_response"
    BAD_REQUEST = "bad_request"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    UNEXPECTED = "unexpected"
    SCHEMA = "schema"  # a reply that is not JSON of the record's response_schema: asked again
    EXPIRED = "expired"  # a batch line the provider did not run within its window
    CANCELLED = "cancelled"  # a batch line cancelled before it ran

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {ErrorKind.RATE_LIMIT, ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.SERVER, ErrorKind.CONFLICT, ErrorKind.INVALID_RESPONSE,
     ErrorKind.SCHEMA, ErrorKind.EXPIRED}  # fmt: skip
)
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


class ProviderError(Exception):
    """A failed request, classified once so the engine never inspects SDK exceptions."""

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind | str,
        status: int | None = None,
        retry_after: float | None = None,
        rate_limits: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.kind = ErrorKind(kind)
        self.status = status
        self.retry_after = retry_after
        self.rate_limits = rate_limits

    @property
    def retryable(self) -> bool:
        return self.kind.retryable


def kind_for_status(status: int) -> ErrorKind:
    if status == 429:
        return ErrorKind.RATE_LIMIT
    if status == 408:
        return ErrorKind.TIMEOUT
    if status == 409:
        return ErrorKind.CONFLICT
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 404:
        return ErrorKind.NOT_FOUND
    return ErrorKind.SERVER if status >= 500 else ErrorKind.BAD_REQUEST


def error_for_status(status: int, message: str, headers: Mapping[str, str] | None = None) -> ProviderError:
    return ProviderError(
        message,
        kind=kind_for_status(status),
        status=status,
        retry_after=parse_retry_after(headers),
        rate_limits=rate_limit_headers(headers),
    )


def rate_limit_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """OpenAI `x-ratelimit-*` and Anthropic `anthropic-ratelimit-*` headers, lower-cased."""
    if not headers:
        return None
    found = {k.lower(): v for k, v in headers.items() if k.lower().startswith(RATE_LIMIT_PREFIXES)}
    return found or None


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `Retry-After` (or the `retry-after-ms` some APIs send); HTTP dates are ignored."""
    if not headers:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def classify(err: BaseException) -> ProviderError:
    """The one map from any failure of a request to a ProviderError."""
    if isinstance(err, ProviderError):
        return err
    if isinstance(err, MediaError):  # a media file swapped or removed after validation
        return ProviderError(str(err), kind=ErrorKind.BAD_REQUEST)
    for name in ("openai", "anthropic"):  # Stainless SDKs: the same exception tree
        sdk = sys.modules.get(name)
        if sdk is not None and isinstance(err, sdk.APIError):
            return _from_stainless(err, sdk)
    genai_errors = sys.modules.get("google.genai.errors")
    if genai_errors is not None and isinstance(err, genai_errors.APIError):
        headers = getattr(getattr(err, "response", None), "headers", None)
        return error_for_status(err.code, err.message or str(err), headers)
    for name in ("httpx", "httpx2"):
        http = sys.modules.get(name)
        if http is not None and isinstance(err, http.TimeoutException):
            return ProviderError("request timed out", kind=ErrorKind.TIMEOUT)
        if http is not None and isinstance(err, http.TransportError):
            return ProviderError(f"connection error: {err}", kind=ErrorKind.CONNECTION)
    if isinstance(err, TimeoutError):  # also aiohttp's timeouts
        return ProviderError("request timed out", kind=ErrorKind.TIMEOUT)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(err, aiohttp.ClientError):  # refused, reset, a body cut short
        return ProviderError(f"connection error: {err}", kind=ErrorKind.CONNECTION)
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(err, pydantic.ValidationError):  # parameters the SDK refused
        return ProviderError(f"invalid parameters: {_first_problem(err)}", kind=ErrorKind.BAD_REQUEST)
    if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)) or type(err).__name__ == "JSONDecodeError":
        return ProviderError(f"malformed response: {err}", kind=ErrorKind.INVALID_RESPONSE)
    return ProviderError(f"{type(err).__name__}: {err}", kind=ErrorKind.UNEXPECTED)


def _from_stainless(err: Exception, sdk) -> ProviderError:  # noqa: ANN001
    if isinstance(err, sdk.APITimeoutError):
        return ProviderError("request timed out", kind=ErrorKind.TIMEOUT)
    if isinstance(err, sdk.APIConnectionError):
        return ProviderError(f"connection error: {err.__cause__ or err}", kind=ErrorKind.CONNECTION)
    if isinstance(err, sdk.APIResponseValidationError):
        return ProviderError(f"malformed response: {err.message}", kind=ErrorKind.INVALID_RESPONSE, status=err.status_code)
    if isinstance(err, sdk.APIStatusError):
        return error_for_status(err.status_code, err.message, err.response.headers)
    return ProviderError(f"malformed response: {type(err).__name__}: {err}", kind=ErrorKind.INVALID_RESPONSE)


def _first_problem(err) -> str:  # noqa: ANN001 - a pydantic ValidationError
    """pydantic's own message is a paragraph; a failed line gets one line: the first field and why."""
    problems = err.errors()
    if not problems:
        return str(err).splitlines()[0]
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "value"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"
