"""`gemini` and `vertexai`: generateContent through the official google-genai SDK
(not the deprecated google-generativeai).

Parameters become the GenerateContentConfig (temperature, max_output_tokens, top_k,
safety_settings, system_instruction, ...), so an unknown key is refused by the SDK's own
validation. System messages become the system instruction; 'assistant' turns are 'model'.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from google import genai
from google.genai import types

from promptfleet.media import MediaFolder, decode_data_url
from promptfleet.messages import LocalMedia, Message, Part, ProviderPart, RemoteMedia, Role, Text
from promptfleet.providers.base import ProviderError, ProviderOptions, Reply


def to_contents(messages: Sequence[Message], media: MediaFolder) -> tuple[str | None, list[types.Content]]:
    """(system instruction, contents) in Gemini's shape."""
    system = "\n\n".join(m.text for m in messages if m.role is Role.SYSTEM)
    contents = [
        types.Content(role="model" if m.role is Role.ASSISTANT else "user", parts=[_part(p, media) for p in m.parts])
        for m in messages
        if m.role is not Role.SYSTEM
    ]
    return system or None, contents


def _part(part: Part, media: MediaFolder) -> types.Part:
    match part:
        case Text(text=text):
            return types.Part(text=text)
        case LocalMedia():
            file = media.read(part)
            return types.Part.from_bytes(data=file.data, mime_type=file.mime_type)
        case RemoteMedia(url=url) if url.startswith("data:"):
            file = decode_data_url(url)
            return types.Part.from_bytes(data=file.data, mime_type=file.mime_type)
        case RemoteMedia(url=url, mime_type=mime):  # an uploaded file (Files API) or gs:// URI
            return types.Part.from_uri(file_uri=url, mime_type=mime or mimetypes.guess_type(url)[0])
        case ProviderPart(data=data):
            return types.Part.model_validate(dict(data))
    raise AssertionError(part)


class GeminiProvider:
    api: ClassVar[str] = "gemini"
    required_env: ClassVar[tuple[str, ...]] = ("GEMINI_API_KEY",)
    optional_env: ClassVar[tuple[str, ...]] = ("GEMINI_BASE_URL",)
    default_rate_per_minute: ClassVar[int] = 10
    media_kinds: ClassVar[frozenset[str]] = frozenset({"image", "audio", "video", "file"})
    media_urls: ClassVar[bool] = True

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

    @property
    def client(self) -> genai.Client:
        return self._client

    def request(self, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> tuple[list[types.Content], types.GenerateContentConfig]:
        """(contents, config) of generateContent; a batch's inlined request carries the same pair."""
        system, contents = to_contents(messages, self._options.media)
        return contents, types.GenerateContentConfig(**({"system_instruction": system} if system else {}), **parameters)

    async def chat(self, model: str, messages: Sequence[Message], parameters: dict[str, Any]) -> Reply:
        contents, config = self.request(model, messages, parameters)
        return reply_of(await self._client.aio.models.generate_content(model=model, contents=contents, config=config))

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


def reply_of(response: types.GenerateContentResponse) -> Reply:
    """A generateContent response (online, or one inlined response of a batch) as a Reply."""
    candidate = response.candidates[0] if response.candidates else None
    if candidate is None:
        reason = response.prompt_feedback.block_reason if response.prompt_feedback else None
        raise ProviderError(f"no candidates (prompt blocked: {reason})", kind="bad_request")
    text = "".join(p.text for p in (candidate.content.parts if candidate.content else None) or [] if p.text)
    usage = response.usage_metadata
    return Reply(
        text=text,
        input_tokens=usage.prompt_token_count if usage else None,
        output_tokens=usage.candidates_token_count if usage else None,
        finish_reason=candidate.finish_reason.value if candidate.finish_reason else None,
    )
