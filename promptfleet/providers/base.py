"""The provider protocol (errors live in `errors.py`).

A provider turns chat messages into one reply. Everything else (pacing, retries,
multi-turn, journaling) is the engine's, so a provider stays a page of code.
"""

from __future__ import annotations

import mimetypes
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from promptfleet.core.media import MediaFolder
from promptfleet.core.messages import Conversation, LocalMedia, Message, RemoteMedia
from promptfleet.providers.errors import (  # noqa: F401 - the provider-facing names
    ErrorKind,
    ProviderError,
    error_for_status,
    parse_retry_after,
    rate_limit_headers,
)


@dataclass
class Reply:
    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    rate_limits: dict[str, str] | None = None  # the provider's rate-limit headers, for the limiter
    # What the provider says produced the answer, for reproducibility:
    model_version: str | None = None  # the `model` the API answered with (may differ from model_name)
    system_fingerprint: str | None = None  # OpenAI's backend configuration fingerprint
    request_id: str | None = None  # the provider's id of this request, for support tickets
    seed: int | None = None  # the seed that was sent, if any
    # Reasoning models: the thought text the provider returned (Gemini's thought parts, Anthropic's
    # thinking blocks, Ollama's `thinking`), and how many of `output_tokens` went on reasoning.
    # `output_tokens` always counts every billed output token, reasoning included.
    thoughts: tuple[str, ...] = ()
    reasoning_tokens: int | None = None
    # The model a self-hosted endpoint (quart, huggingface-tgi) says it serves: prompto keeps it as `model`.
    served_model: str | None = None


def seed_sent(parameters: Mapping[str, Any]) -> int | None:
    """The `seed` parameter as sent (OpenAI, Gemini, Ollama take one; Anthropic has none)."""
    seed = parameters.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


@dataclass(frozen=True)
class ProviderOptions:
    """Run-wide settings every provider receives."""

    media_dir: Path = Path("data/media")
    timeout: float = 120.0

    @property
    def media(self) -> MediaFolder:
        """Providers read local files only through this, never by path."""
        return MediaFolder(self.media_dir)


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
    media_kinds: ClassVar[frozenset[str]]  # "image", "audio", "video", "file"; others are refused at validation
    media_urls: ClassVar[bool]  # takes http(s) media URLs (data: URIs are always inlined)
    # Optional: True when chat() takes `response_schema` (a JSON Schema) and asks the API for
    # JSON of that shape; records with a schema are refused at validation for other providers.
    structured_output: ClassVar[bool]
    # Optional: a classmethod `parameter_problems(model, parameters) -> list[str]`, run by `check`
    # (see `parameter_problems` below).

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None: ...

    async def chat(self, model: str, messages: list[Message], parameters: dict[str, Any]) -> Reply: ...

    async def aclose(self) -> None: ...


def parameters_of(cls: type[Provider], record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's `parameters`, with the top-level keys prompto reads as parameters of this api
    (a provider's `record_keys`, e.g. Gemini's `safety_filter`)."""
    parameters = dict(record.get("parameters") or {})
    parameters.update({key: record[key] for key in getattr(cls, "record_keys", ()) if key in record})
    return parameters


def parameter_problems(cls: type[Provider], model: str, parameters: Mapping[str, Any]) -> list[str]:
    """What is wrong with a record's parameters for this provider and model, one line each
    (a provider checks what it knows: reasoning settings and their limits, mostly)."""
    check = getattr(cls, "parameter_problems", None)
    return list(check(model, parameters)) if check else []


def count(value: Any) -> int | None:
    """A token count as a provider reported it; anything but an int is no count."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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


_PLURAL = {"image": "images", "file": "files"}


def media_problem(cls: type[Provider], conversation: Conversation) -> str | None:
    """Why `cls` cannot be given this conversation's media, if it cannot."""
    for part in conversation.media:
        if part.kind not in cls.media_kinds:
            return f"the {cls.api} api does not take {_PLURAL.get(part.kind, part.kind)}"
        if isinstance(part, RemoteMedia) and not part.url.startswith("data:") and not cls.media_urls:
            return f"the {cls.api} api does not take media URLs; put the file in the media folder"
        if (refusal := getattr(cls, "media_refusal", None)) and (why := refusal(part)):
            return why  # e.g. an audio format or document type the API cannot read
    return None


def mime_type_of(part: LocalMedia | RemoteMedia) -> str | None:
    """The mime type a media part will be sent with, from its file name (or data: URI)."""
    if isinstance(part, RemoteMedia):
        if part.url.startswith("data:"):
            return part.url.removeprefix("data:").split(";")[0].split(",")[0] or None
        return part.mime_type or mimetypes.guess_type(part.url)[0]
    return mimetypes.guess_type(part.ref)[0]
