"""`openai`: chat completions through the official SDK, for OpenAI and any compatible server
(vLLM, llama.cpp, LM Studio, a proxy) via OPENAI_BASE_URL.

Parameters go to the API as they are (`extra_body`), so a misspelt one is reported by the
server instead of being dropped here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import openai

from promptfleet.providers.base import (
    Message,
    ProviderError,
    ProviderOptions,
    Reply,
    error_for_status,
    parse_retry_after,
    read_media,
)


def to_openai_messages(messages: list[Message], options: ProviderOptions) -> list[dict[str, Any]]:
    """Our message shape (prompto's) to OpenAI's: 'model' is 'assistant', media becomes data URLs."""
    out = []
    for message in messages:
        role = "assistant" if message["role"] == "model" else message["role"]
        content = message.get("content", message.get("parts"))
        if isinstance(content, list) or isinstance(content, dict):
            parts = content if isinstance(content, list) else [content]
            content = [_part(p, options) for p in parts]
        out.append({"role": role, "content": content})
    return out


def _part(part: Any, options: ProviderOptions) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text", part.get("media", ""))}
    if kind == "image":
        mime, data = read_media(options.media_dir, part["media"])
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
    if kind == "image_url":
        spec = part["image_url"] if isinstance(part["image_url"], dict) else {"url": part["image_url"]}
        url = spec["url"]
        if not url.startswith(("http://", "https://", "data:")):
            mime, data = read_media(options.media_dir, url)
            url = f"data:{mime};base64,{data}"
        return {"type": "image_url", "image_url": {**spec, "url": url}}
    return part


def map_error(err: openai.OpenAIError) -> ProviderError:
    if isinstance(err, openai.APITimeoutError):
        return ProviderError("request timed out", kind="timeout", retryable=True)
    if isinstance(err, openai.APIConnectionError):
        return ProviderError(f"connection error: {err.__cause__ or err}", kind="connection", retryable=True)
    if isinstance(err, openai.APIResponseValidationError):
        return ProviderError(f"malformed response: {err.message}", kind="invalid_response", status=err.status_code, retryable=True)
    if isinstance(err, openai.APIStatusError):
        headers = err.response.headers
        return error_for_status(err.status_code, err.message, parse_retry_after(headers))
    return ProviderError(str(err), kind="invalid_response", retryable=True)


class OpenAIProvider:
    api: ClassVar[str] = "openai"
    required_env: ClassVar[tuple[str, ...]] = ("OPENAI_API_KEY",)
    optional_env: ClassVar[tuple[str, ...]] = ("OPENAI_BASE_URL",)
    default_rate_per_minute: ClassVar[int] = 10

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        self._options = options
        self._client = self._make_client(env, options)

    def _make_client(self, env: Mapping[str, str], options: ProviderOptions) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=env["OPENAI_API_KEY"],
            base_url=env.get("OPENAI_BASE_URL"),
            max_retries=0,  # the engine owns retrying
            timeout=options.timeout,
        )

    async def chat(self, model: str, messages: list[Message], parameters: dict[str, Any]) -> Reply:
        try:
            completion = await self._client.chat.completions.create(
                model=model, messages=to_openai_messages(messages, self._options), extra_body=parameters or None
            )
        except openai.OpenAIError as err:
            raise map_error(err) from None
        except ValueError as err:  # the SDK lets a body that is not JSON through as JSONDecodeError
            raise ProviderError(f"malformed response: {err}", kind="invalid_response", retryable=True) from None
        if not completion.choices:
            raise ProviderError("response has no choices", kind="invalid_response", retryable=True)
        choice = completion.choices[0]
        usage = completion.usage
        return Reply(
            text=choice.message.content or "",
            input_tokens=usage.prompt_tokens if usage else None,
            output_tokens=usage.completion_tokens if usage else None,
            finish_reason=choice.finish_reason,
        )

    async def aclose(self) -> None:
        await self._client.close()
