"""The provider protocol and the one error taxonomy the engine understands.

A provider turns chat messages into one reply. Everything else (pacing, retries,
multi-turn, journaling) is the engine's, so a provider stays a page of code.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

Message = dict[str, Any]


@dataclass
class Reply:
    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class ProviderOptions:
    """Run-wide settings every provider receives."""

    media_dir: Path = Path("data/media")
    timeout: float = 120.0


class ProviderError(Exception):
    """A failed request, classified once so the engine never inspects SDK exceptions.

    kind is one of: rate_limit, timeout, connection, server, bad_request, auth,
    not_found, invalid_response, unexpected.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


_KIND_BY_STATUS = {400: "bad_request", 401: "auth", 403: "auth", 404: "not_found", 408: "timeout", 429: "rate_limit"}


def error_for_status(status: int, message: str, retry_after: float | None = None) -> ProviderError:
    """408, 409, 429 and 5xx are worth retrying; any other status fails at once."""
    retryable = status in (408, 409, 429) or status >= 500
    kind = _KIND_BY_STATUS.get(status, "server" if status >= 500 else "bad_request")
    return ProviderError(message, kind=kind, status=status, retryable=retryable, retry_after=retry_after)


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


DEFAULT_RATE_PER_MINUTE = 10  # prompto's -mq default


class Provider(Protocol):
    """What an `api` value in an experiment file maps to.

    `required_env` names the variables the provider needs; each may be overridden per
    model as `NAME_<model>` (prompto's rule). One instance serves every prompt that
    resolves to the same credentials, so it should hold one pooled client.
    """

    api: ClassVar[str]
    required_env: ClassVar[tuple[str, ...]]
    optional_env: ClassVar[tuple[str, ...]]
    default_rate_per_minute: ClassVar[int]  # used when neither -mq nor -mqj says otherwise

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None: ...

    async def chat(self, model: str, messages: list[Message], parameters: dict[str, Any]) -> Reply: ...

    async def aclose(self) -> None: ...


def model_env_suffix(model: str) -> str:
    return re.sub(r"[-/. ]", "_", model)


def resolve_env(names: tuple[str, ...], model: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Values for `names`, the model-specific `NAME_<model>` winning over `NAME`; unset ones omitted."""
    suffix = model_env_suffix(model)
    found = {}
    for name in names:
        value = environ.get(f"{name}_{suffix}") or environ.get(name)
        if value:
            found[name] = value
    return found


def missing_env(cls: type[Provider], model: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    present = resolve_env(cls.required_env, model, environ)
    return [name for name in cls.required_env if name not in present]


def read_media(media_dir: Path, ref: str) -> tuple[str, str]:
    """(mime type, base64 data) of a media file, already checked to lie inside media_dir."""
    path = media_dir / ref
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return mime, base64.b64encode(path.read_bytes()).decode("ascii")


def text_of(message: Message) -> str:
    """The text of a message whose content may be a list of parts."""
    content = message.get("content", message.get("parts"))
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = [p if isinstance(p, str) else p.get("text", p.get("media", "")) for p in parts if p is not None]
    return " ".join(t for t in texts if isinstance(t, str))


@dataclass
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    calls: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def add(self, reply: Reply) -> None:
        self.calls += 1
        if reply.input_tokens is not None:
            self.input_tokens = (self.input_tokens or 0) + reply.input_tokens
        if reply.output_tokens is not None:
            self.output_tokens = (self.output_tokens or 0) + reply.output_tokens
        if reply.finish_reason:
            self.finish_reasons.append(reply.finish_reason)
