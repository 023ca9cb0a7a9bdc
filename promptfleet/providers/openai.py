"""`openai`: chat completions through the official SDK, for OpenAI and any compatible server
(vLLM, llama.cpp, LM Studio, a proxy) via OPENAI_BASE_URL. `azure-openai` and
`huggingface-tgi` are the same protocol with other endpoints and credentials.

Parameters go to the API as they are, so a misspelt one is reported by the server instead
of being dropped here. Reasoning models take `reasoning_effort` (checked against the SDK's
values at `check`); the Responses API's `{"reasoning": {"effort": ...}}` is sent as it.
Reasoning tokens come from `completion_tokens_details`; servers that return the reasoning
text (vLLM, llama.cpp, DeepSeek: `reasoning_content` or `reasoning`) give the reply's
thoughts. The SDK configures the client; requests go through the lean transport in
`http.py` (Azure's deployment paths stay with the SDK).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, get_args

import orjson

from promptfleet.core.media import MediaFolder, decode_data_url
from promptfleet.core.messages import (
    LocalMedia,
    Message,
    Part,
    ProviderPart,
    RemoteMedia,
    Text,
)
from promptfleet.core.schemas import strict_compatible
from promptfleet.providers.base import (
    ErrorKind,
    ProviderError,
    ProviderOptions,
    Reply,
    count,
    error_for_status,
    mime_type_of,
    rate_limit_headers,
    seed_sent,
)
from promptfleet.providers.http import JsonPoster, status_message

if TYPE_CHECKING:  # the SDK is imported when a client is made: `check` reads only the class
    import openai
    from openai.types.chat import ChatCompletion


def to_openai_messages(messages: Sequence[Message], media: MediaFolder) -> list[dict[str, Any]]:
    """Typed messages in OpenAI's shape; local images become data URLs."""
    out = []
    for message in messages:
        if message.is_text and len(message.parts) == 1:
            content: Any = message.text
        else:
            content = [_part(p, media) for p in message.parts]
        out.append({"role": message.role.value, "content": content})
    return out


def _part(part: Part, media: MediaFolder) -> dict[str, Any]:
    match part:
        case Text(text=text):
            return {"type": "text", "text": text}
        case LocalMedia() | RemoteMedia() if part.kind == "image":
            url = media.read(part).data_url if isinstance(part, LocalMedia) else part.url
            return {"type": "image_url", "image_url": {"url": url, **({"detail": part.detail} if part.detail else {})}}
        case LocalMedia() | RemoteMedia() if part.kind == "audio":  # audio-capable models (gpt-4o-audio-preview, ...)
            file = media.read(part) if isinstance(part, LocalMedia) else decode_data_url(part.url)
            if file.mime_type not in AUDIO_FORMATS:
                raise ProviderError(f"openai takes WAV or MP3 audio, not {file.mime_type}", kind="bad_request")
            return {"type": "input_audio", "input_audio": {"data": file.base64, "format": AUDIO_FORMATS[file.mime_type]}}
        case LocalMedia() | RemoteMedia() if part.kind == "file":  # PDF input
            file = media.read(part) if isinstance(part, LocalMedia) else decode_data_url(part.url)
            name = Path(part.ref).name if isinstance(part, LocalMedia) else "document.pdf"
            return {"type": "file", "file": {"filename": name, "file_data": file.data_url}}
        case ProviderPart(data=data):
            return dict(data)
    raise ProviderError(f"openai cannot take {part.kind} media", kind="bad_request")  # type: ignore[union-attr]


AUDIO_FORMATS = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3"}


def openai_media_refusal(api: str, part: LocalMedia | RemoteMedia) -> str | None:
    """Audio must be WAV or MP3 and files PDF, both inline (chat completions take no URL for them)."""
    if part.kind not in ("audio", "file"):
        return None
    if isinstance(part, RemoteMedia) and not part.url.startswith("data:"):
        return f"the {api} api takes {part.kind} only inline; put the file in the media folder"
    mime = mime_type_of(part)
    if part.kind == "audio" and mime not in AUDIO_FORMATS:
        return f"the {api} api takes audio as WAV or MP3, not {mime or 'an unknown type'}"
    if part.kind == "file" and mime != "application/pdf":
        return f"the {api} api takes PDF files, not {mime or 'an unknown type'}"
    return None


@cache
def efforts() -> tuple[str, ...]:
    """The SDK's own list of levels, imported only for a file that sets one."""
    from openai.types.shared import ReasoningEffort

    return tuple(a for arg in get_args(ReasoningEffort) for a in get_args(arg))


def reasoning_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """`reasoning: {effort}` (the Responses API's spelling) as chat completions' `reasoning_effort`;
    a `reasoning` object with more in it is left for the servers that read it (OpenRouter, vLLM)."""
    reasoning = parameters.get("reasoning")
    if not (isinstance(reasoning, Mapping) and set(reasoning) == {"effort"}):
        return dict(parameters)
    return {**{k: v for k, v in parameters.items() if k != "reasoning"}, "reasoning_effort": reasoning["effort"]}


def reasoning_problems(parameters: Mapping[str, Any]) -> list[str]:
    sent = reasoning_parameters(parameters)
    if "reasoning_effort" in sent and sent["reasoning_effort"] not in efforts():
        return [f"reasoning effort must be one of {', '.join(efforts())}, got {sent['reasoning_effort']!r}"]
    if "reasoning" in parameters and not isinstance(parameters["reasoning"], Mapping):
        return [f"reasoning must be an object such as {{\"effort\": \"low\"}}, got {parameters['reasoning']!r}"]
    return []


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's structured output; strict when the schema allows it (closed objects, all required)."""
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema, "strict": strict_compatible(schema)}}


class OpenAIProvider:
    api: ClassVar[str] = "openai"
    required_env: ClassVar[tuple[str, ...]] = ("OPENAI_API_KEY",)
    optional_env: ClassVar[tuple[str, ...]] = ("OPENAI_BASE_URL",)
    default_rate_per_minute: ClassVar[int] = 10
    media_kinds: ClassVar[frozenset[str]] = frozenset({"image", "audio", "file"})
    media_urls: ClassVar[bool] = True
    structured_output: ClassVar[bool] = True
    lean: ClassVar[bool] = True  # requests through `JsonPoster` rather than the SDK

    @classmethod
    def media_refusal(cls, part: LocalMedia | RemoteMedia) -> str | None:
        return openai_media_refusal(cls.api, part)

    @classmethod
    def parameter_problems(cls, model: str, parameters: Mapping[str, Any]) -> list[str]:
        return reasoning_problems(parameters)

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        self._options = options
        self._client = self.make_client(env, options)
        self._http: JsonPoster | None = None
        if self.lean:
            headers = {k: v for k, v in {**self._client.default_headers, **self._client.auth_headers}.items() if isinstance(v, str)}
            self._http = JsonPoster(f"{str(self._client.base_url).rstrip('/')}/chat/completions", headers, options.timeout)

    @staticmethod
    def make_client(env: Mapping[str, str], options: ProviderOptions) -> openai.AsyncOpenAI:
        import openai

        # max_retries=0: the engine owns retrying.
        return openai.AsyncOpenAI(
            api_key=env["OPENAI_API_KEY"], base_url=env.get("OPENAI_BASE_URL"), max_retries=0, timeout=options.timeout
        )

    @property
    def client(self) -> openai.AsyncOpenAI:
        return self._client

    def request(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The chat completions body; the batch API sends the same one per line."""
        body = {**reasoning_parameters(parameters), "model": model, "messages": to_openai_messages(messages, self._options.media)}
        if response_schema is not None:
            body["response_format"] = response_format(response_schema)
        return body

    async def chat(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> Reply:
        body = self.request(model, messages, parameters, response_schema)
        if self._http is None:
            extra = {k: v for k, v in body.items() if k not in ("model", "messages")}
            raw = await self._client.chat.completions.with_raw_response.create(
                model=body["model"], messages=body["messages"], extra_body=extra or None
            )
            status, headers, content = raw.status_code, raw.headers, raw.content
        else:
            status, headers, content = await self._http.post(body)
            if status >= 400:  # the SDK raises these itself
                raise error_for_status(status, status_message(status, content), headers)
        request_id = headers.get("x-request-id") or headers.get("apim-request-id")
        return reply_of_body(orjson.loads(content), rate_limit_headers(headers), request_id, seed_sent(parameters))

    async def aclose(self) -> None:
        try:
            if self._http is not None:
                await self._http.aclose()
        finally:
            await self._client.close()


def reply_of(
    completion: ChatCompletion, rate_limits: dict[str, str] | None = None, request_id: str | None = None, seed: int | None = None
) -> Reply:
    """A chat completion (one line of a batch's output) as a Reply."""
    return reply_of_body(completion.model_dump(), rate_limits, request_id, seed)


def reply_of_body(
    completion: Any, rate_limits: dict[str, str] | None = None, request_id: str | None = None, seed: int | None = None
) -> Reply:
    """A chat completion as parsed JSON as a Reply; a body of another shape is a malformed response."""
    try:
        choice = completion["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ProviderError("malformed response: no choices with a message", kind=ErrorKind.INVALID_RESPONSE) from None
    if not isinstance(text, str):
        raise ProviderError("malformed response: the message content is not text", kind=ErrorKind.INVALID_RESPONSE)
    usage = completion.get("usage") or {}
    details = usage.get("completion_tokens_details") or {}
    thought = message.get("reasoning_content") or message.get("reasoning")
    return Reply(
        text=text,
        input_tokens=count(usage.get("prompt_tokens")),
        output_tokens=count(usage.get("completion_tokens")),  # reasoning included, as OpenAI bills it
        reasoning_tokens=count(details.get("reasoning_tokens")) if isinstance(details, dict) else None,
        thoughts=(thought,) if isinstance(thought, str) and thought else (),
        finish_reason=choice.get("finish_reason"),
        rate_limits=rate_limits,
        model_version=completion.get("model") or None,
        system_fingerprint=completion.get("system_fingerprint"),
        request_id=request_id or completion.get("id") or None,
        seed=seed,
    )


class AzureOpenAIProvider(OpenAIProvider):
    """`azure-openai`: `model_name` is the deployment name."""

    api: ClassVar[str] = "azure-openai"
    lean: ClassVar[bool] = False  # deployment paths and api-version: the SDK builds them
    required_env: ClassVar[tuple[str, ...]] = ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_API_ENDPOINT")
    optional_env: ClassVar[tuple[str, ...]] = ("AZURE_OPENAI_API_VERSION",)
    default_api_version: ClassVar[str] = "2024-10-21"

    @staticmethod
    def make_client(env: Mapping[str, str], options: ProviderOptions) -> openai.AsyncOpenAI:
        import openai

        return openai.AsyncAzureOpenAI(
            api_key=env["AZURE_OPENAI_API_KEY"],
            azure_endpoint=env["AZURE_OPENAI_API_ENDPOINT"],
            api_version=env.get("AZURE_OPENAI_API_VERSION", AzureOpenAIProvider.default_api_version),
            max_retries=0,
            timeout=options.timeout,
        )


class HuggingFaceTGIProvider(OpenAIProvider):
    """`huggingface-tgi`: Text Generation Inference's OpenAI-compatible Messages API."""

    api: ClassVar[str] = "huggingface-tgi"
    required_env: ClassVar[tuple[str, ...]] = ("HUGGINGFACE_TGI_API_ENDPOINT",)
    optional_env: ClassVar[tuple[str, ...]] = ("HUGGINGFACE_TGI_API_KEY",)
    media_kinds: ClassVar[frozenset[str]] = frozenset()  # TGI's Messages API serves text models
    structured_output: ClassVar[bool] = False  # TGI's grammar format is its own; not mapped yet

    async def chat(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> Reply:
        reply = await super().chat(model, messages, parameters, response_schema)
        reply.served_model = reply.model_version  # `model_name` only names the endpoint here
        return reply

    @staticmethod
    def make_client(env: Mapping[str, str], options: ProviderOptions) -> openai.AsyncOpenAI:
        import openai

        endpoint = env["HUGGINGFACE_TGI_API_ENDPOINT"].rstrip("/")
        return openai.AsyncOpenAI(
            api_key=env.get("HUGGINGFACE_TGI_API_KEY", "-"),  # TGI without auth ignores it
            base_url=endpoint if endpoint.endswith("/v1") else f"{endpoint}/v1",
            max_retries=0,
            timeout=options.timeout,
        )
