"""`anthropic`: the Messages API through the official SDK.

System messages become Anthropic's `system`; `max_tokens`, which the API requires,
defaults to 1024 when the experiment does not set it. Extended thinking is the API's own
`thinking` parameter; its blocks come back as the reply's thoughts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from promptfleet.core.media import MediaFolder, decode_data_url
from promptfleet.core.messages import (
    LocalMedia,
    Message,
    Part,
    ProviderPart,
    RemoteMedia,
    Role,
    Text,
)
from promptfleet.providers.base import (
    ProviderError,
    ProviderOptions,
    Reply,
    count,
    mime_type_of,
    rate_limit_headers,
)

if TYPE_CHECKING:  # the SDK is imported when a client is made: `check` reads only the class
    import anthropic

DEFAULT_MAX_TOKENS = 1024
MIN_THINKING_BUDGET = 1024  # the API refuses a smaller budget_tokens
THINKING_TYPES = ("enabled", "disabled", "adaptive")


def to_anthropic(messages: Sequence[Message], media: MediaFolder) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, messages) in Anthropic's shape."""
    system = "\n\n".join(m.text for m in messages if m.role is Role.SYSTEM)
    rest = [{"role": m.role.value, "content": _content(m, media)} for m in messages if m.role is not Role.SYSTEM]
    return system or None, rest


def _content(message: Message, media: MediaFolder) -> str | list[dict[str, Any]]:
    if message.is_text and len(message.parts) == 1:
        return message.text
    return [_block(part, media) for part in message.parts]


def _block(part: Part, media: MediaFolder) -> dict[str, Any]:
    match part:
        case Text(text=text):
            return {"type": "text", "text": text}
        case RemoteMedia(kind="image", url=url) if not url.startswith("data:"):
            return {"type": "image", "source": {"type": "url", "url": url}}
        case LocalMedia(kind="image") | RemoteMedia(kind="image"):
            file = media.read(part) if isinstance(part, LocalMedia) else decode_data_url(part.url)
            return {"type": "image", "source": {"type": "base64", "media_type": file.mime_type, "data": file.base64}}
        case RemoteMedia(kind="file", url=url) if not url.startswith("data:"):
            return {"type": "document", "source": {"type": "url", "url": url}}
        case LocalMedia(kind="file") | RemoteMedia(kind="file"):  # PDF document blocks
            file = media.read(part) if isinstance(part, LocalMedia) else decode_data_url(part.url)
            return {"type": "document", "source": {"type": "base64", "media_type": file.mime_type, "data": file.base64}}
        case ProviderPart(data=data):
            return dict(data)
    raise ProviderError(f"anthropic cannot take {part.kind} media", kind="bad_request")  # type: ignore[union-attr]


class AnthropicProvider:
    api: ClassVar[str] = "anthropic"
    required_env: ClassVar[tuple[str, ...]] = ("ANTHROPIC_API_KEY",)
    optional_env: ClassVar[tuple[str, ...]] = ("ANTHROPIC_BASE_URL",)
    default_rate_per_minute: ClassVar[int] = 10
    media_kinds: ClassVar[frozenset[str]] = frozenset({"image", "file"})
    media_urls: ClassVar[bool] = True
    structured_output: ClassVar[bool] = True

    @classmethod
    def media_refusal(cls, part: LocalMedia | RemoteMedia) -> str | None:
        mime = mime_type_of(part)
        if part.kind == "file" and mime != "application/pdf" and not (isinstance(part, RemoteMedia) and mime is None):
            return f"the anthropic api takes PDF documents, not {mime or 'an unknown type'}"
        return None

    @classmethod
    def parameter_problems(cls, model: str, parameters: Mapping[str, Any]) -> list[str]:
        return thinking_problems(parameters)

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        import anthropic

        self._options = options
        self._client = anthropic.AsyncAnthropic(
            api_key=env["ANTHROPIC_API_KEY"], base_url=env.get("ANTHROPIC_BASE_URL"), max_retries=0, timeout=options.timeout
        )

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        return self._client

    def request(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The Messages API body; a Message Batch carries the same one as each request's params."""
        system, turns = to_anthropic(messages, self._options.media)
        params = dict(parameters)
        max_tokens = params.pop("max_tokens", DEFAULT_MAX_TOKENS)
        if system is not None:
            params["system"] = system
        if response_schema is not None:  # structured outputs: the API's own parameter, no forced tool
            params["output_config"] = {"format": {"type": "json_schema", "schema": response_schema}}
        return {**params, "model": model, "max_tokens": max_tokens, "messages": turns}

    async def chat(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> Reply:
        body = self.request(model, messages, parameters, response_schema)
        extra = {k: v for k, v in body.items() if k not in ("model", "max_tokens", "messages")}
        raw = await self._client.messages.with_raw_response.create(
            model=model, max_tokens=body["max_tokens"], messages=body["messages"], extra_body=extra or None
        )
        return reply_of(await raw.parse(), rate_limit_headers(raw.headers), raw.headers.get("request-id"))

    async def aclose(self) -> None:
        await self._client.close()


def thinking_problems(parameters: Mapping[str, Any]) -> list[str]:
    """The rules of `thinking` the API would answer 400 for, found before anything is sent."""
    thinking = parameters.get("thinking")
    if thinking is None:
        return []
    if not isinstance(thinking, Mapping) or thinking.get("type") not in THINKING_TYPES:
        return [f"thinking must be an object with type one of {', '.join(THINKING_TYPES)}, got {thinking!r}"]
    if thinking["type"] != "enabled":
        return []
    budget, max_tokens = thinking.get("budget_tokens"), parameters.get("max_tokens", DEFAULT_MAX_TOKENS)
    if count(budget) is None or budget < MIN_THINKING_BUDGET:
        return [f"thinking.budget_tokens must be an integer of at least {MIN_THINKING_BUDGET}, got {budget!r}"]
    problems = []
    if count(max_tokens) is not None and max_tokens <= budget:
        default = "" if "max_tokens" in parameters else f" (the default, {DEFAULT_MAX_TOKENS})"
        problems.append(f"max_tokens {max_tokens}{default} must be greater than thinking.budget_tokens {budget}")
    if parameters.get("temperature", 1) != 1 or "top_k" in parameters:
        problems.append("thinking cannot be combined with temperature (other than 1) or top_k")
    return problems


def reply_of(response: anthropic.types.Message, rate_limits: dict[str, str] | None = None, request_id: str | None = None) -> Reply:
    """A Message (online, or one succeeded result of a batch) as a Reply."""
    texts = [block.text for block in response.content if getattr(block, "type", None) == "text"]
    thoughts = tuple(block.thinking for block in response.content if getattr(block, "type", None) == "thinking")
    if not texts and response.stop_reason != "max_tokens":
        raise ProviderError("response has no text content", kind="invalid_response")
    details = getattr(response.usage, "output_tokens_details", None)
    return Reply(
        text="".join(texts),
        input_tokens=response.usage.input_tokens,
        output_tokens=response.usage.output_tokens,  # thinking included: Anthropic bills it as output
        finish_reason=response.stop_reason,
        rate_limits=rate_limits,
        model_version=response.model or None,
        request_id=request_id or response.id or None,
        thoughts=thoughts,
        reasoning_tokens=count(getattr(details, "thinking_tokens", None)),
    )
