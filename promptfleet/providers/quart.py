"""`quart`: prompto's small server for a Hugging Face `transformers` model (`prompto_quart_server`).

The wire protocol is prompto's: `POST {QUART_API_ENDPOINT}/generate` with
`{"text": prompt, "model": model_name, "options": parameters}`, answered with
`{"response": [{"generated_text": ...}], "model": <the model the server loaded>}`. The
model the server names is kept in the output as `model`, as prompto does: `model_name`
only picks the endpoint (`QUART_API_ENDPOINT_<model>` wins over `QUART_API_ENDPOINT`).

A single user prompt is sent as a string, as prompto does. Chat messages and multi-turn
prompts are sent as a list of `{role, content}` messages: a transformers text-generation
pipeline applies the model's chat template to such a list (the model must have one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson

from promptfleet.core.messages import Message, Role
from promptfleet.providers.base import ErrorKind, ProviderError, ProviderOptions, Reply, error_for_status
from promptfleet.providers.http import JsonPoster, status_message


def quart_text(messages: Sequence[Message]) -> str | list[dict[str, str]]:
    """What prompto's server takes as `text`: the prompt, or the chat for the model's template."""
    if len(messages) == 1 and messages[0].role is Role.USER:
        return messages[0].text
    return [{"role": m.role.value, "content": m.text} for m in messages]


class QuartProvider:
    api: ClassVar[str] = "quart"
    required_env: ClassVar[tuple[str, ...]] = ("QUART_API_ENDPOINT",)
    optional_env: ClassVar[tuple[str, ...]] = ()
    default_rate_per_minute: ClassVar[int] = 10
    media_kinds: ClassVar[frozenset[str]] = frozenset()  # the server's pipeline reads text
    media_urls: ClassVar[bool] = False
    structured_output: ClassVar[bool] = False

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        endpoint = env["QUART_API_ENDPOINT"].rstrip("/")
        self._http = JsonPoster(f"{endpoint}/generate", {}, options.timeout)

    async def chat(self, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> Reply:
        status, headers, content = await self._http.post({"text": quart_text(messages), "model": model, "options": parameters})
        if status >= 400:
            raise error_for_status(status, status_message(status, content), headers)
        return reply_of(content)

    async def aclose(self) -> None:
        await self._http.aclose()


def reply_of(content: bytes) -> Reply:
    """The server's answer; any other shape is a malformed response (retried, like garbage from any API)."""
    try:
        body = orjson.loads(content)
        text = body["response"][0]["generated_text"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ProviderError("malformed response: no response[0].generated_text", kind=ErrorKind.INVALID_RESPONSE) from None
    if not isinstance(text, str):
        raise ProviderError("malformed response: generated_text is not text", kind=ErrorKind.INVALID_RESPONSE)
    served = body.get("model")
    served = served if isinstance(served, str) else None
    return Reply(text=text, model_version=served, served_model=served)
