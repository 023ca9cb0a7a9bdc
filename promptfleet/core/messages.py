"""Typed chat messages, parsed once from a record's `prompt` and `multimedia`.

Experiment files spell content in several shapes (prompto's strings and `{type, media}`
items, OpenAI's `image_url` parts, Gemini's `parts`). They all become the few part types
below here, so a provider maps typed parts and never re-reads the raw record, and one
function (`media_part`) decides what is a local file and what is a URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

REMOTE_SCHEMES = ("http://", "https://", "data:", "gs://")
MEDIA_KINDS = ("image", "audio", "video", "file")


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


ROLE_ALIASES = {"system": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT, "model": Role.ASSISTANT}


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class LocalMedia:
    """A file under the data folder's `media/`, by its path relative to that folder.

    Only `promptfleet.core.media.MediaFolder` turns this into bytes, after confining it."""

    kind: str
    ref: str
    detail: str | None = None  # OpenAI's image detail, kept when the file said it


@dataclass(frozen=True, slots=True)
class RemoteMedia:
    """An http(s)/gs URL or a data: URI: passed on, never read from disk."""

    kind: str
    url: str
    mime_type: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderPart:
    """An API-specific part (e.g. Gemini's `function_call`), passed through as written."""

    data: Mapping[str, Any]


Part = Text | LocalMedia | RemoteMedia | ProviderPart


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.parts if isinstance(p, Text))

    @property
    def is_text(self) -> bool:
        return all(isinstance(p, Text) for p in self.parts)

    @property
    def media(self) -> list[LocalMedia | RemoteMedia]:
        return [p for p in self.parts if isinstance(p, (LocalMedia, RemoteMedia))]


def user(text: str) -> Message:
    return Message(Role.USER, (Text(text),))


def assistant(text: str) -> Message:
    return Message(Role.ASSISTANT, (Text(text),))


@dataclass(frozen=True, slots=True)
class Conversation:
    """The messages to send first, and the later user turns of a prompto multi-turn prompt
    (a list of strings, answered in turn); `later_turns` is None for any other prompt."""

    messages: tuple[Message, ...]
    later_turns: tuple[str, ...] | None = None

    @property
    def media(self) -> list[LocalMedia | RemoteMedia]:
        return [m for message in self.messages for m in message.media]


class PromptError(ValueError):
    """A prompt or multimedia item of a shape no provider can be given."""


def is_remote(reference: str) -> bool:
    return reference.startswith(REMOTE_SCHEMES)


def media_part(kind: str, reference: Any, detail: str | None = None, mime_type: str | None = None) -> LocalMedia | RemoteMedia:
    """The one place that decides whether a reference names a local file: anything that is
    not an http(s)/gs URL or a data: URI is a path, and paths are confined to media/."""
    if not isinstance(reference, str) or not reference:
        raise PromptError(f"{kind} reference must be a non-empty string, got {reference!r}")
    if is_remote(reference):
        return RemoteMedia(kind, reference, mime_type, detail)
    return LocalMedia(kind, reference, detail)


def parse_part(item: Any) -> Part:
    """One content item in any of the accepted shapes."""
    if isinstance(item, str):
        return Text(item)
    if not isinstance(item, Mapping):
        raise PromptError(f"content item must be a string or an object, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "text":
        text = item.get("text", item.get("media"))
        if not isinstance(text, str):
            raise PromptError("text item needs a string 'text' (or prompto's 'media')")
        return Text(text)
    if kind == "image_url":  # OpenAI's form: a string or {url, detail}
        spec = item.get("image_url")
        url, detail = (spec.get("url"), spec.get("detail")) if isinstance(spec, Mapping) else (spec, None)
        return media_part("image", url, detail)
    if kind in SOURCE_KINDS and isinstance(item.get("source"), Mapping):
        return _source_part(SOURCE_KINDS[kind], item["source"])
    if kind in MEDIA_KINDS or (kind is None and "media" in item):
        reference = item.get("media", item.get("url"))
        return media_part(kind or "image", reference, item.get("detail"), item.get("mime_type"))
    if kind is None and set(item) == {"text"} and isinstance(item["text"], str):  # Gemini's {"text": ...}
        return Text(item["text"])
    return ProviderPart(dict(item))


SOURCE_KINDS = {"image": "image", "document": "file"}  # Anthropic's blocks that carry a `source`


def _source_part(kind: str, source: Mapping[str, Any]) -> LocalMedia | RemoteMedia:
    """Anthropic's `source`: prompto's `{media, media_type}` names a file in the media folder;
    the API's own `{type: base64, media_type, data}` and `{type: url, url}` pass on as they are."""
    mime = source.get("media_type")
    if source.get("type") == "base64":
        if not isinstance(mime, str) or not isinstance(source.get("data"), str):
            raise PromptError(f"{kind} source of type base64 needs string 'media_type' and 'data'")
        return RemoteMedia(kind, f"data:{mime};base64,{source['data']}", mime)
    if source.get("type") == "url":
        return media_part(kind, source.get("url"), mime_type=mime)
    if "media" not in source:
        raise PromptError(f"{kind} source needs 'media' (a file in the media folder), or the API's base64/url form")
    return media_part(kind, source["media"], mime_type=mime)


def parse_content(content: Any) -> tuple[Part, ...]:
    if isinstance(content, (str, Mapping)):
        return (parse_part(content),)
    if isinstance(content, list):
        return tuple(parse_part(item) for item in content)
    raise PromptError("message content must be a string, an object or a list")


def parse_conversation(prompt: Any, multimedia: Any = None) -> Conversation:
    """A record's `prompt` (string, list of strings, or chat messages) and top-level
    `multimedia` (added to the first user turn, or the last message of a chat)."""
    extra = parse_content(multimedia) if multimedia else ()
    if isinstance(prompt, str):
        return Conversation((Message(Role.USER, (Text(prompt), *extra)),))
    if not isinstance(prompt, list) or not prompt:
        raise PromptError("must be a string, a non-empty list of strings, or a non-empty list of {role, content} messages")
    if all(isinstance(p, str) for p in prompt):
        return Conversation((Message(Role.USER, (Text(prompt[0]), *extra)),), tuple(prompt[1:]))
    messages = []
    for n, raw in enumerate(prompt):
        if not isinstance(raw, Mapping):
            raise PromptError(f"item {n} is a {type(raw).__name__}: mix of strings and messages")
        role = ROLE_ALIASES.get(raw.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise PromptError(f"message {n} has role {raw.get('role')!r}; expected one of {sorted(ROLE_ALIASES)}")
        content = raw.get("content", raw.get("parts"))
        if content is None:
            raise PromptError(f"message {n} has no 'content'")
        messages.append(Message(role, parse_content(content)))
    if extra:
        messages[-1] = Message(messages[-1].role, (*messages[-1].parts, *extra))
    return Conversation(tuple(messages))
