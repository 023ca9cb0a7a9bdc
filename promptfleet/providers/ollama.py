"""`ollama`: a local or remote Ollama server over its REST API (/api/generate for a
single prompt, /api/chat for conversations), with one pooled httpx client per endpoint.

`parameters` are Ollama's `options` (num_predict, temperature, ...); `keep_alive`,
`format` and `think`, if given, go next to them at the top level of the request. A thinking
model's `thinking` comes back as the reply's thoughts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx

from promptfleet.core.media import MediaFolder, decode_data_url
from promptfleet.core.messages import LocalMedia, Message, RemoteMedia, Text
from promptfleet.providers.base import (
    ProviderError,
    ProviderOptions,
    Reply,
    error_for_status,
    seed_sent,
)

TOP_LEVEL = ("keep_alive", "format", "think")
THINK_LEVELS = ("low", "medium", "high")  # besides true/false, for models that take a level (gpt-oss)


def to_ollama(message: Message, media: MediaFolder) -> dict[str, Any]:
    """Ollama takes text plus a list of base64 images per message."""
    out: dict[str, Any] = {"role": message.role.value, "content": "\n".join(p.text for p in message.parts if isinstance(p, Text))}
    images = []
    for part in message.parts:
        if isinstance(part, LocalMedia):
            images.append(media.read(part).base64)
        elif isinstance(part, RemoteMedia) and part.url.startswith("data:"):
            images.append(decode_data_url(part.url).base64)
        elif not isinstance(part, Text):
            raise ProviderError(f"ollama cannot take this content part: {part}", kind="bad_request")
    if images:
        out["images"] = images
    return out


class OllamaProvider:
    api: ClassVar[str] = "ollama"
    required_env: ClassVar[tuple[str, ...]] = ("OLLAMA_API_ENDPOINT",)
    optional_env: ClassVar[tuple[str, ...]] = ()
    default_rate_per_minute: ClassVar[int] = 10
    media_kinds: ClassVar[frozenset[str]] = frozenset({"image"})
    media_urls: ClassVar[bool] = False
    structured_output: ClassVar[bool] = True

    @classmethod
    def parameter_problems(cls, model: str, parameters: Mapping[str, Any]) -> list[str]:
        think = parameters.get("think")
        if think is None or isinstance(think, bool) or think in THINK_LEVELS:
            return []
        return [f"think must be true, false or one of {', '.join(THINK_LEVELS)}, got {think!r}"]

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        self._options = options
        self._client = httpx.AsyncClient(
            base_url=env["OLLAMA_API_ENDPOINT"].rstrip("/"),
            timeout=options.timeout,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    async def chat(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> Reply:
        converted = [to_ollama(m, self._options.media) for m in messages]
        body: dict[str, Any] = {"model": model, "stream": False}
        if response_schema is not None:
            body["format"] = response_schema  # Ollama's structured outputs take the JSON Schema itself
        body.update({k: parameters[k] for k in TOP_LEVEL if k in parameters})
        if options := {k: v for k, v in parameters.items() if k not in TOP_LEVEL}:
            body["options"] = options
        single = len(converted) == 1 and converted[0]["role"] == "user"
        if single:  # a plain prompt: generate, as prompto does
            body["prompt"] = converted[0]["content"]
            if "images" in converted[0]:
                body["images"] = converted[0]["images"]
        else:
            body["messages"] = converted
        response = await self._client.post("/api/generate" if single else "/api/chat", json=body)
        try:
            data = response.json()
        except ValueError:
            if response.is_success:
                raise ProviderError("malformed response: not JSON", kind="invalid_response") from None
            data = {"error": response.text[:500]}
        if not response.is_success:
            message = data.get("error", response.reason_phrase) if isinstance(data, dict) else response.reason_phrase
            raise error_for_status(response.status_code, str(message), response.headers)
        answer = data if single else (data.get("message") or {})
        text, thinking = answer.get("response" if single else "content"), answer.get("thinking")
        if text is None:
            raise ProviderError("malformed response: no answer in body", kind="invalid_response")
        return Reply(
            text=text,
            input_tokens=data.get("prompt_eval_count"),
            output_tokens=data.get("eval_count"),
            finish_reason=data.get("done_reason"),
            model_version=data.get("model"),
            seed=seed_sent(parameters),
            thoughts=(thinking,) if isinstance(thinking, str) and thinking else (),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
