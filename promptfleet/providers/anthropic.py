"""`anthropic`: the Messages API through the official SDK.

System messages become Anthropic's `system`; `max_tokens`, which the API requires,
defaults to 1024 when the experiment does not set it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import anthropic

from promptfleet.providers.base import (
    Message,
    ProviderError,
    ProviderOptions,
    Reply,
    content_parts,
    error_from_sdk,
    rate_limit_headers,
    read_media,
)

DEFAULT_MAX_TOKENS = 1024


def to_anthropic(messages: list[Message], options: ProviderOptions) -> tuple[str | None, list[dict[str, Any]]]:
    """(system prompt, messages) in Anthropic's shape."""
    system = [m for m in messages if m["role"] == "system"]
    rest = [
        {"role": "assistant" if m["role"] == "model" else m["role"], "content": _content(m, options)}
        for m in messages
        if m["role"] != "system"
    ]
    return ("\n\n".join(str(m.get("content", "")) for m in system) or None), rest


def _content(message: Message, options: ProviderOptions) -> Any:
    content = message.get("content", message.get("parts"))
    if isinstance(content, str):
        return content
    blocks = []
    for part in content_parts(message):
        if isinstance(part, str):
            blocks.append({"type": "text", "text": part})
        elif part.get("type") == "image":
            mime, data = read_media(options.media_dir, part["media"])
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}})
        else:
            blocks.append(part)
    return blocks


class AnthropicProvider:
    api: ClassVar[str] = "anthropic"
    required_env: ClassVar[tuple[str, ...]] = ("ANTHROPIC_API_KEY",)
    optional_env: ClassVar[tuple[str, ...]] = ("ANTHROPIC_BASE_URL",)
    default_rate_per_minute: ClassVar[int] = 10
    accepts_images: ClassVar[bool] = True

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        self._options = options
        self._client = anthropic.AsyncAnthropic(
            api_key=env["ANTHROPIC_API_KEY"], base_url=env.get("ANTHROPIC_BASE_URL"), max_retries=0, timeout=options.timeout
        )

    async def chat(self, model: str, messages: list[Message], parameters: dict[str, Any]) -> Reply:
        system, turns = to_anthropic(messages, self._options)
        params = dict(parameters)
        max_tokens = params.pop("max_tokens", DEFAULT_MAX_TOKENS)
        if system is not None:
            params["system"] = system
        try:
            raw = await self._client.messages.with_raw_response.create(
                model=model, max_tokens=max_tokens, messages=turns, extra_body=params or None
            )
            response = await raw.parse()
        except (anthropic.AnthropicError, ValueError) as err:
            raise error_from_sdk(err, anthropic) from None
        texts = [block.text for block in response.content if getattr(block, "type", None) == "text"]
        if not texts and response.stop_reason != "max_tokens":
            raise ProviderError("response has no text content", kind="invalid_response", retryable=False)
        return Reply(
            text="".join(texts),
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
            finish_reason=response.stop_reason,
            rate_limits=rate_limit_headers(raw.headers),
        )

    async def aclose(self) -> None:
        await self._client.close()
