"""`gemini` and `vertexai`: generateContent through the official google-genai SDK
(not the deprecated google-generativeai).

Parameters become the GenerateContentConfig (temperature, max_output_tokens, top_k,
safety_settings, system_instruction, ...), so an unknown key is refused by the SDK's own
validation. System messages become the system instruction; 'assistant' turns are 'model'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import httpx2
import pydantic
from google import genai
from google.genai import errors, types

from promptfleet.providers.base import (
    Message,
    ProviderError,
    ProviderOptions,
    Reply,
    content_parts,
    error_for_status,
    media_bytes,
)


def to_contents(messages: list[Message], options: ProviderOptions) -> tuple[str | None, list[types.Content]]:
    """(system instruction, contents) in Gemini's shape."""
    system = "\n\n".join(str(m.get("content", m.get("parts", ""))) for m in messages if m["role"] == "system")
    contents = [
        types.Content(role="model" if m["role"] in ("assistant", "model") else "user", parts=_parts(m, options))
        for m in messages
        if m["role"] != "system"
    ]
    return system or None, contents


def _parts(message: Message, options: ProviderOptions) -> list[types.Part]:
    parts = []
    for part in content_parts(message):
        if isinstance(part, str):
            parts.append(types.Part(text=part))
        elif part.get("type") == "image":
            mime, data = media_bytes(options.media_dir, part["media"])
            parts.append(types.Part.from_bytes(data=data, mime_type=mime))
        elif part.get("type") == "file":  # a file already uploaded to the Files API
            parts.append(types.Part.from_uri(file_uri=part["media"], mime_type=part.get("mime_type")))
        else:
            parts.append(types.Part.model_validate(part))
    return parts


def map_error(err: Exception) -> ProviderError:
    if isinstance(err, errors.APIError):
        headers = getattr(getattr(err, "response", None), "headers", None)
        return error_for_status(err.code, err.message or str(err), headers)
    if isinstance(err, httpx2.TimeoutException):
        return ProviderError("request timed out", kind="timeout", retryable=True)
    if isinstance(err, httpx2.TransportError):
        return ProviderError(f"connection error: {err}", kind="connection", retryable=True)
    if isinstance(err, pydantic.ValidationError):
        return ProviderError(f"invalid parameters: {err}", kind="bad_request", retryable=False)
    return ProviderError(f"malformed response: {type(err).__name__}: {err}", kind="invalid_response", retryable=True)


class GeminiProvider:
    api: ClassVar[str] = "gemini"
    required_env: ClassVar[tuple[str, ...]] = ("GEMINI_API_KEY",)
    optional_env: ClassVar[tuple[str, ...]] = ("GEMINI_BASE_URL",)
    default_rate_per_minute: ClassVar[int] = 10
    accepts_images: ClassVar[bool] = True

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        self._options = options
        self._client = genai.Client(
            api_key=env["GEMINI_API_KEY"], http_options=self.http_options(env, "GEMINI_BASE_URL", options)
        )

    @staticmethod
    def http_options(env: Mapping[str, str], base_url_var: str, options: ProviderOptions) -> types.HttpOptions:
        # attempts=1: the engine owns retrying.
        return types.HttpOptions(
            base_url=env.get(base_url_var),
            timeout=int(options.timeout * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
        )

    async def chat(self, model: str, messages: list[Message], parameters: dict[str, Any]) -> Reply:
        system, contents = to_contents(messages, self._options)
        try:
            config = types.GenerateContentConfig(**({"system_instruction": system} if system else {}), **parameters)
            response = await self._client.aio.models.generate_content(model=model, contents=contents, config=config)
        except Exception as err:  # noqa: BLE001 - classified below; nothing escapes unclassified
            raise map_error(err) from None
        candidate = response.candidates[0] if response.candidates else None
        if candidate is None:
            reason = response.prompt_feedback.block_reason if response.prompt_feedback else None
            raise ProviderError(f"no candidates (prompt blocked: {reason})", kind="bad_request", retryable=False)
        text = "".join(p.text for p in (candidate.content.parts if candidate.content else None) or [] if p.text)
        usage = response.usage_metadata
        return Reply(
            text=text,
            input_tokens=usage.prompt_token_count if usage else None,
            output_tokens=usage.candidates_token_count if usage else None,
            finish_reason=candidate.finish_reason.value if candidate.finish_reason else None,
        )

    async def aclose(self) -> None:
        await self._client.aio.aclose()


class VertexAIProvider(GeminiProvider):
    """`vertexai`: the same SDK in Vertex mode. Credentials are Google's application
    default credentials, or an OAuth access token in VERTEXAI_ACCESS_TOKEN."""

    api: ClassVar[str] = "vertexai"
    required_env: ClassVar[tuple[str, ...]] = ("VERTEXAI_PROJECT_ID", "VERTEXAI_LOCATION_ID")
    optional_env: ClassVar[tuple[str, ...]] = ("VERTEXAI_BASE_URL", "VERTEXAI_ACCESS_TOKEN")

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        self._options = options
        credentials = None
        if token := env.get("VERTEXAI_ACCESS_TOKEN"):
            from google.oauth2.credentials import Credentials

            credentials = Credentials(token=token)
        self._client = genai.Client(
            vertexai=True,
            project=env["VERTEXAI_PROJECT_ID"],
            location=env["VERTEXAI_LOCATION_ID"],
            credentials=credentials,
            http_options=self.http_options(env, "VERTEXAI_BASE_URL", options),
        )
