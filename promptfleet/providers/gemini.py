"""`gemini` and `vertexai`: generateContent through the official google-genai SDK
(not the deprecated google-generativeai).

Parameters become the GenerateContentConfig (temperature, max_output_tokens, top_k,
safety_settings, system_instruction, ...), so an unknown key is refused by the SDK's own
validation. System messages become the system instruction; 'assistant' turns are 'model'.

Media of every kind (image, audio, video, PDF) is sent inline; a file over the inline
limit goes to the Gemini File API instead, once: uploads are found again by SHA-256, so a
file used by many prompts, runs or `promptfleet upload-media` is uploaded a single time.
Vertex has no File API: large files there are given as gs:// URIs.

Thinking: prompto's flat `thinking_budget` and `include_thoughts` (and `thinking_level`) become
the config's ThinkingConfig, range-checked per model family at `check`; thought parts come
back as the reply's thoughts, and `thoughts_token_count` is billed as output.
"""

from __future__ import annotations

import asyncio
import mimetypes
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from promptfleet.core.media import MediaFile, MediaFolder, decode_data_url
from promptfleet.core.messages import (
    LocalMedia,
    Message,
    Part,
    ProviderPart,
    RemoteMedia,
    Role,
    Text,
)
from promptfleet.providers import gemini_files
from promptfleet.providers.base import (
    ErrorKind,
    ProviderError,
    ProviderOptions,
    Reply,
    count,
    seed_sent,
)

if TYPE_CHECKING:  # the SDK loads with a client, or to validate parameters: `check` reads only the class
    from google import genai
    from google.genai import types

    Uploaded = Mapping[str, types.File]  # media ref -> its File API upload

INLINE_LIMIT_BYTES = 20 * 1024 * 1024  # Gemini refuses requests with more inline data than this

THINKING_KEYS = ("thinking_budget", "include_thoughts", "thinking_level")  # prompto's flat spelling, and Gemini 3's level
# thinking_budget per model family (Google's published limits): (lowest, highest, may be 0 to turn thinking off).
# -1 asks for a dynamic budget everywhere. Longest matching prefix wins.
THINKING_BUDGETS = {
    "gemini-2.5-pro": (128, 32768, False),
    "gemini-2.5-flash": (1, 24576, True),
    "gemini-2.5-flash-lite": (512, 24576, True),
}
NOT_THINKING = ("gemini-1.", "gemini-2.0")  # families that take no thinking settings
# prompto's top-level `safety_filter`: one threshold for the four harm categories it sets.
SAFETY_FILTERS = {"none": "BLOCK_NONE", "few": "BLOCK_ONLY_HIGH", "default": "BLOCK_MEDIUM_AND_ABOVE",
                  "some": "BLOCK_MEDIUM_AND_ABOVE", "most": "BLOCK_LOW_AND_ABOVE"}  # fmt: skip
HARM_CATEGORIES = ("HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_HARASSMENT",
                   "HARM_CATEGORY_SEXUALLY_EXPLICIT")  # fmt: skip


def to_contents(messages: Sequence[Message], media: MediaFolder, uploaded: Uploaded | None = None) -> tuple[str | None, list[types.Content]]:
    """(system instruction, contents) in Gemini's shape; `uploaded` files are referenced by URI."""
    from google.genai import types

    system = "\n\n".join(m.text for m in messages if m.role is Role.SYSTEM)
    contents = [
        types.Content(role="model" if m.role is Role.ASSISTANT else "user", parts=[_part(p, media, uploaded or {}) for p in m.parts])
        for m in messages
        if m.role is not Role.SYSTEM
    ]
    return system or None, contents


def _part(part: Part, media: MediaFolder, uploaded: Uploaded) -> types.Part:
    from google.genai import types

    match part:
        case Text(text=text):
            return types.Part(text=text)
        case LocalMedia(ref=ref) if ref in uploaded:
            return types.Part.from_uri(file_uri=uploaded[ref].uri, mime_type=uploaded[ref].mime_type)
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


class FileUploads:
    """The File API for one client: what is already uploaded (listed once), and one upload
    per distinct content even when many prompts ask for the same file at once."""

    def __init__(self, client: genai.Client) -> None:
        self._client = client
        self._known: dict[str, types.File] | None = None
        self._listing = asyncio.Lock()
        self._pending: dict[str, asyncio.Future[types.File]] = {}

    async def remote(self, file: MediaFile, display_name: str) -> types.File:
        digest = gemini_files.sha256_hex(file.data)
        task = self._pending.get(digest)
        if task is None or (task.done() and (task.cancelled() or task.exception())):  # a failed upload is tried again
            task = self._pending[digest] = asyncio.ensure_future(self._upload(file, display_name))
        return await task

    async def _upload(self, file: MediaFile, display_name: str) -> types.File:
        async with self._listing:
            if self._known is None:
                self._known = await gemini_files.uploaded_by_hash(self._client)
        remote, _ = await gemini_files.ensure_uploaded(self._client, file.data, file.mime_type, display_name, self._known)
        return remote


class GeminiProvider:
    api: ClassVar[str] = "gemini"
    required_env: ClassVar[tuple[str, ...]] = ("GEMINI_API_KEY",)
    optional_env: ClassVar[tuple[str, ...]] = ("GEMINI_BASE_URL",)
    default_rate_per_minute: ClassVar[int] = 10
    media_kinds: ClassVar[frozenset[str]] = frozenset({"image", "audio", "video", "file"})
    media_urls: ClassVar[bool] = True
    structured_output: ClassVar[bool] = True
    record_keys: ClassVar[tuple[str, ...]] = ("safety_filter",)

    @classmethod
    def parameter_problems(cls, model: str, parameters: Mapping[str, Any]) -> list[str]:
        problems = thinking_problems(model, parameters) + safety_problems(parameters)
        parameters = {k: v for k, v in parameters.items() if k != "safety_filter"}
        if problems:  # reported already: the SDK would only say the same again
            parameters = {k: v for k, v in parameters.items() if k not in (*THINKING_KEYS, "thinking_config")}
        if not parameters:  # nothing for the SDK to validate: not worth its import
            return problems
        from google.genai import types

        try:
            with warnings.catch_warnings():  # the SDK warns before it refuses; the refusal is the line we report
                warnings.simplefilter("ignore")
                types.GenerateContentConfig(**generation_config(parameters))
        except (ValueError, TypeError) as err:  # pydantic's ValidationError is a ValueError
            problems += config_errors(err)
        return problems

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        from google import genai

        self._options = options
        self._client = genai.Client(
            api_key=env["GEMINI_API_KEY"], http_options=gemini_files.http_options(env, "GEMINI_BASE_URL", options)
        )
        self._files: FileUploads | None = FileUploads(self._client)
        self.inline_limit_bytes = INLINE_LIMIT_BYTES

    @property
    def client(self) -> genai.Client:
        return self._client

    def request(
        self,
        model: str,
        messages: Sequence[Message],
        parameters: dict[str, Any],
        response_schema: dict[str, Any] | None = None,
        uploaded: Uploaded | None = None,
    ) -> tuple[list[types.Content], types.GenerateContentConfig]:
        """(contents, config) of generateContent; a batch's inlined request carries the same pair."""
        from google.genai import types

        system, contents = to_contents(messages, self._options.media, uploaded)
        asked = {"response_mime_type": "application/json", "response_json_schema": response_schema} if response_schema is not None else {}
        config = generation_config(parameters)
        return contents, types.GenerateContentConfig(**({"system_instruction": system} if system else {}), **asked, **config)

    async def chat(
        self, model: str, messages: Sequence[Message], parameters: dict[str, Any], response_schema: dict[str, Any] | None = None
    ) -> Reply:
        try:
            uploaded = await self._upload_large(messages)
        except gemini_files.UploadFailed as err:  # the File API could not process it: sending again will not help
            raise ProviderError(str(err), kind=ErrorKind.BAD_REQUEST) from None
        contents, config = self.request(model, messages, parameters, response_schema, uploaded)
        response = await self._client.aio.models.generate_content(model=model, contents=contents, config=config)
        return reply_of(response, seed_sent(parameters))

    async def _upload_large(self, messages: Sequence[Message]) -> dict[str, types.File]:
        """File API uploads for local media, largest first, until what stays inline fits
        the request's inline limit."""
        media = self._options.media
        parts = {p.ref: p for m in messages for p in m.parts if isinstance(p, LocalMedia)}
        sizes = sorted(((media.resolve(ref).stat().st_size, ref) for ref in parts), reverse=True)
        inline = sum(size for size, _ in sizes)
        uploaded: dict[str, types.File] = {}
        for size, ref in sizes:
            if inline <= self.inline_limit_bytes:
                break
            if self._files is None:
                raise ProviderError(
                    f"media file {ref!r} takes the request over the {self.inline_limit_bytes // 2**20} MB inline limit; "
                    f"give {self.api} large files as gs:// URIs", kind="bad_request",
                )  # fmt: skip
            uploaded[ref] = await self._files.remote(media.read(parts[ref]), Path(ref).name)
            inline -= size
        return uploaded

    async def aclose(self) -> None:
        await self._client.aio.aclose()


class VertexAIProvider(GeminiProvider):
    """`vertexai`: the same SDK in Vertex mode. Credentials are Google's application
    default credentials, or an OAuth access token in VERTEXAI_ACCESS_TOKEN."""

    api: ClassVar[str] = "vertexai"
    required_env: ClassVar[tuple[str, ...]] = ("VERTEXAI_PROJECT_ID", "VERTEXAI_LOCATION_ID")
    optional_env: ClassVar[tuple[str, ...]] = ("VERTEXAI_BASE_URL", "VERTEXAI_ACCESS_TOKEN")

    def __init__(self, env: Mapping[str, str], options: ProviderOptions) -> None:
        from google import genai

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
            http_options=gemini_files.http_options(env, "VERTEXAI_BASE_URL", options),
        )
        self._files = None  # the File API is the Gemini Developer API's only
        self.inline_limit_bytes = INLINE_LIMIT_BYTES


def safety_problems(parameters: Mapping[str, Any]) -> list[str]:
    if "safety_filter" not in parameters:
        return []
    if parameters["safety_filter"] not in SAFETY_FILTERS:
        return [f"safety_filter must be one of {', '.join(SAFETY_FILTERS)}, got {parameters['safety_filter']!r}"]
    return ["safety_filter and safety_settings cannot both be set"] if "safety_settings" in parameters else []


def generation_config(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters as GenerateContentConfig takes them: the flat thinking keys moved into
    `thinking_config` (a `thinking_config` written out in full is kept, the flat keys added to
    it), prompto's `safety_filter` as the safety settings it stands for."""
    config = {k: v for k, v in parameters.items() if k not in (*THINKING_KEYS, "safety_filter")}
    if (level := SAFETY_FILTERS.get(parameters.get("safety_filter"))) is not None:  # type: ignore[arg-type]
        config["safety_settings"] = [{"category": category, "threshold": level} for category in HARM_CATEGORIES]
    flat = {k: parameters[k] for k in THINKING_KEYS if k in parameters}
    if not flat:
        return config
    written = config.get("thinking_config")
    config["thinking_config"] = {**(written if isinstance(written, Mapping) else {}), **flat}
    return config


def _family(model: str) -> str:
    return model.rsplit("/", 1)[-1]  # "models/gemini-2.5-pro" and Vertex's publisher paths name the same model


def thinking_problems(model: str, parameters: Mapping[str, Any]) -> list[str]:
    """Gemini's thinking settings against what the model's family takes."""
    written = parameters.get("thinking_config") or {}
    if not isinstance(written, Mapping):
        return ["thinking_config must be an object"]
    settings = {**written, **{k: parameters[k] for k in THINKING_KEYS if k in parameters}}
    if not settings:
        return []
    name = _family(model)
    if name.startswith(NOT_THINKING) and "thinking" not in name:
        return [f"{model} does not think: {', '.join(sorted(settings))} is for Gemini 2.5 and later models"]
    problems = []
    if "include_thoughts" in settings and not isinstance(settings["include_thoughts"], bool):
        problems.append(f"include_thoughts must be true or false, got {settings['include_thoughts']!r}")
    level = settings.get("thinking_level")
    if level is not None and str(level).upper() not in thinking_levels():
        levels = [m.lower() for m in thinking_levels() if m != "THINKING_LEVEL_UNSPECIFIED"]
        problems.append(f"thinking_level must be one of {', '.join(levels)}, got {level!r}")
    if "thinking_budget" in settings:
        problems += _budget_problems(model, settings["thinking_budget"], level is not None)
    return problems


def thinking_levels() -> tuple[str, ...]:
    """The SDK's own ThinkingLevel names, imported only for a file that sets a level."""
    from google.genai import types

    return tuple(types.ThinkingLevel.__members__)


def _budget_problems(model: str, budget: Any, with_level: bool) -> list[str]:
    if with_level:
        return ["thinking_budget and thinking_level cannot both be set"]
    if count(budget) is None or budget < -1:
        return [f"thinking_budget must be an integer (-1 for a dynamic budget), got {budget!r}"]
    family = max((f for f in THINKING_BUDGETS if _family(model).startswith(f)), key=len, default=None)
    if family is None or budget == -1:
        return []
    low, high, may_stop = THINKING_BUDGETS[family]
    if budget == 0 and may_stop:
        return []
    if not low <= budget <= high:
        off = ", or 0 to turn thinking off" if may_stop else "; thinking cannot be turned off"
        return [f"thinking_budget {budget} is out of range for {family}: {low} to {high}, -1 for dynamic{off}"]
    return []


def config_errors(err: Exception) -> list[str]:
    """The SDK's validation of GenerateContentConfig, one line per field."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return [str(err)]
    lines = []
    for e in errors():
        where = ".".join(str(p) for p in e["loc"])
        lines.append(f"{where} is not a Gemini generation parameter" if e["type"] == "extra_forbidden" else f"{where}: {e['msg']}")
    return lines


def reply_of(response: types.GenerateContentResponse, seed: int | None = None) -> Reply:
    """A generateContent response (online, or one inlined response of a batch) as a Reply."""
    candidate = response.candidates[0] if response.candidates else None
    if candidate is None:
        reason = response.prompt_feedback.block_reason if response.prompt_feedback else None
        raise ProviderError(f"no candidates (prompt blocked: {reason})", kind="bad_request")
    parts = [p for p in (candidate.content.parts if candidate.content else None) or [] if p.text]
    usage = response.usage_metadata
    answer, thinking = (usage.candidates_token_count, usage.thoughts_token_count) if usage else (None, None)
    return Reply(
        text="".join(p.text for p in parts if not p.thought),
        input_tokens=usage.prompt_token_count if usage else None,
        output_tokens=(answer or 0) + (thinking or 0) if answer is not None or thinking is not None else None,
        finish_reason=candidate.finish_reason.value if candidate.finish_reason else None,
        model_version=response.model_version,
        request_id=response.response_id,
        seed=seed,
        thoughts=tuple(p.text for p in parts if p.thought),
        reasoning_tokens=thinking,
    )
