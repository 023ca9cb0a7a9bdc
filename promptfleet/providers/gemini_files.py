"""Gemini File API uploads, each file uploaded once and found again by its content hash.

The API keeps a SHA-256 of every uploaded file, so before uploading we list what is
there and reuse a file whose hash matches: a re-run, or a second experiment using the
same video, costs no upload. Used by `promptfleet upload-media` (prompto's
`prompto_upload_media`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from promptfleet.core.experiment import (
    ExperimentError,
    Issue,
    check_extension,
    scan,
    write_records,
)
from promptfleet.core.media import MediaError, MediaFolder
from promptfleet.core.messages import LocalMedia, PromptError, media_part
from promptfleet.providers.base import ProviderOptions

if TYPE_CHECKING:  # the SDK is imported when a client is made: `check` reads only the provider class
    from google import genai
    from google.genai import types

UPLOADED_KEY = "uploaded_filename"  # prompto's key for the File API name on a media part


class UploadFailed(Exception):
    """The File API could not take or process a file; sending it again will not help."""


def http_options(env: Mapping[str, str], base_url_var: str, options: ProviderOptions) -> types.HttpOptions:
    from google.genai import types

    # attempts=1: the engine owns retrying.
    return types.HttpOptions(
        base_url=env.get(base_url_var),
        timeout=int(options.timeout * 1000),
        retry_options=types.HttpRetryOptions(attempts=1),
    )


def client_for(env: Mapping[str, str], timeout: float = 300.0) -> genai.Client:
    from google import genai

    options = http_options(env, "GEMINI_BASE_URL", ProviderOptions(timeout=timeout))
    return genai.Client(api_key=env["GEMINI_API_KEY"], http_options=options)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remote_hex(value: str | None) -> str | None:
    """The hex SHA-256 of a remote file. The API sends it base64-encoded, and what is
    encoded has been seen both as the hex text and as the raw 32 bytes."""
    if not value:
        return None
    if len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) == 32:
        return raw.hex()
    text = raw.decode("ascii", errors="replace")
    return text.lower() if len(text) == 64 else None


async def uploaded_by_hash(client: genai.Client) -> dict[str, types.File]:
    """Every file the key has uploaded, by hex SHA-256."""
    from google.genai import types

    found: dict[str, types.File] = {}
    async for remote in await client.aio.files.list(config={"page_size": 100}):
        if (digest := remote_hex(remote.sha256_hash)) and remote.state != types.FileState.FAILED:
            found.setdefault(digest, remote)
    return found


async def wait_until_active(client: genai.Client, remote: types.File, poll: float = 1.0, timeout: float = 600.0) -> types.File:
    """Videos are processed after upload; a prompt may only use them once ACTIVE."""
    from google.genai import types

    waited = 0.0
    while remote.state == types.FileState.PROCESSING:
        if waited >= timeout:
            raise TimeoutError(f"{remote.name} still processing after {timeout:g}s")
        await asyncio.sleep(poll)
        waited += poll
        remote = await client.aio.files.get(name=remote.name)
    if remote.state == types.FileState.FAILED:
        raise UploadFailed(f"the File API could not process {remote.display_name or remote.name}")
    return remote


async def ensure_uploaded(
    client: genai.Client, data: bytes, mime_type: str, display_name: str, known: dict[str, types.File]
) -> tuple[types.File, bool]:
    """(remote file, whether it was uploaded now) for these bytes; `known` is updated."""
    digest = sha256_hex(data)
    if digest in known:
        return await wait_until_active(client, known[digest]), False
    remote = await client.aio.files.upload(
        file=io.BytesIO(data), config={"mime_type": mime_type, "display_name": display_name}
    )
    known[digest] = remote
    return await wait_until_active(client, remote), True


async def delete_all(client: genai.Client) -> int:
    names = [remote.name async for remote in await client.aio.files.list(config={"page_size": 100})]
    for name in names:
        await client.aio.files.delete(name=name)
    return len(names)


def media_items(record: dict) -> list[dict]:
    """The media dicts of a record (top-level `multimedia` and parts of chat messages)."""
    items = [i for i in record.get("multimedia") or [] if isinstance(i, dict) and "media" in i]
    prompt = record.get("prompt")
    for message in prompt if isinstance(prompt, list) else []:
        if isinstance(message, dict):
            parts = message.get("parts", message.get("content"))
            items += [p for p in parts if isinstance(p, dict) and "media" in p and p.get("type") != "text"] if isinstance(parts, list) else []
    return items


# --- `promptfleet upload-media upload`: an experiment's media, uploaded once per distinct file ---

GEMINI_APIS = ("gemini",)  # the File API belongs to the Gemini Developer API, not Vertex


@dataclass(frozen=True)
class UploadReport:
    files: int
    uploaded: int
    reused: int


def _local(item: dict) -> LocalMedia | None:
    part = media_part(item.get("type") or "image", item["media"])
    return part if isinstance(part, LocalMedia) else None


def _unsafe_media(record: dict, media: MediaFolder) -> str | None:
    """Every local media item, of every type, must be a file inside the media folder."""
    try:
        for item in media_items(record):
            if (part := _local(item)) is not None:
                media.resolve(part.ref)
    except (MediaError, PromptError) as err:
        return str(err)
    return None


async def upload_experiment_media(client: genai.Client, experiment: Path, media_folder: Path, out: Path) -> UploadReport:
    check_extension(experiment)
    media = MediaFolder(media_folder)
    records = []
    issues: list[Issue | str] = []
    for item in scan(experiment):
        line, record = item.line, item.value
        if isinstance(record, Issue):
            issues.append(record)
        elif not isinstance(record, dict):
            issues.append(Issue(str(experiment), line, None, f"expected a JSON object, got {type(record).__name__}"))
        elif record.get("api") in GEMINI_APIS and (problem := _unsafe_media(record, media)):
            issues.append(Issue(str(experiment), line, "multimedia", problem))
        else:
            records.append(record)
    if issues:
        raise ExperimentError(issues)
    known = await uploaded_by_hash(client)
    by_path: dict[str, str] = {}
    uploaded = reused = 0
    for record in records:
        if record.get("api") not in GEMINI_APIS:
            continue
        for item in media_items(record):
            if (part := _local(item)) is None:
                continue  # a URL: nothing to upload
            if part.ref not in by_path:
                try:
                    file = media.read(part)
                except MediaError as err:  # changed since it was checked
                    raise ExperimentError([f"{experiment}: {err}"]) from None
                mime = item.get("mime_type") or file.mime_type
                remote, fresh = await ensure_uploaded(client, file.data, mime, Path(part.ref).name, known)
                by_path[part.ref] = remote.name
                uploaded, reused = uploaded + fresh, reused + (not fresh)
            item[UPLOADED_KEY] = by_path[part.ref]
    write_records(out, iter(records))
    return UploadReport(len(by_path), uploaded, reused)
