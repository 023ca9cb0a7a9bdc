"""`promptfleet upload-media upload`: send an experiment's Gemini media to the File API
once per distinct file and write the experiment with the uploads named in it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google import genai

from promptfleet import gemini_files
from promptfleet.experiment import ExperimentError, Issue, check_extension, scan
from promptfleet.judge import write_records
from promptfleet.media import MediaError, MediaFolder
from promptfleet.messages import LocalMedia, PromptError, media_part

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
        for item in gemini_files.media_items(record):
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
    known = await gemini_files.uploaded_by_hash(client)
    by_path: dict[str, str] = {}
    uploaded = reused = 0
    for record in records:
        if record.get("api") not in GEMINI_APIS:
            continue
        for item in gemini_files.media_items(record):
            if (part := _local(item)) is None:
                continue  # a URL: nothing to upload
            if part.ref not in by_path:
                try:
                    file = media.read(part)
                except MediaError as err:  # changed since it was checked
                    raise ExperimentError([f"{experiment}: {err}"]) from None
                mime = item.get("mime_type") or file.mime_type
                remote, fresh = await gemini_files.ensure_uploaded(client, file.data, mime, Path(part.ref).name, known)
                by_path[part.ref] = remote.name
                uploaded, reused = uploaded + fresh, reused + (not fresh)
            item[gemini_files.UPLOADED_KEY] = by_path[part.ref]
    write_records(out, iter(records))
    return UploadReport(len(by_path), uploaded, reused)
