"""`promptfleet upload-media upload|list|delete`: prompto's `prompto_upload_media`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from promptfleet.cli.options import (
    EXIT_BAD_INPUT,
    EnvFile,
    File,
    err,
    load_env,
    report_issues,
)
from promptfleet.cli.root import group
from promptfleet.core.experiment import ExperimentError

upload_media = group("upload-media", "Gemini File API uploads (prompto_upload_media), reused by content hash.")


def _files() -> Any:
    """The File API module, imported only when a File API command runs (google-genai takes ~0.7 s)."""
    from promptfleet.providers import gemini_files

    return gemini_files


def _gemini_client(env_file: Path):
    load_env(env_file)
    if not os.environ.get("GEMINI_API_KEY"):
        err.print("GEMINI_API_KEY is not set (environment or --env-file)")
        raise typer.Exit(EXIT_BAD_INPUT)
    return _files().client_for(os.environ)


def _gemini_call(work: Awaitable[Any]) -> Any:
    """Run a File API call; a refusal or a network failure is one line, never a key."""
    import httpx2
    from google.genai.errors import APIError

    from promptfleet.providers import redact
    from promptfleet.providers.gemini_files import UploadFailed

    try:
        return asyncio.run(work)
    except ExperimentError as error:
        report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (APIError, UploadFailed, TimeoutError, httpx2.HTTPError, OSError) as error:
        err.print(f"Gemini File API: {redact(str(error), (os.environ.get('GEMINI_API_KEY', ''),))}", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@upload_media.command("upload")
def upload_media_upload(
    file: File,
    media_folder: Annotated[Path, typer.Option("--media-folder", "-m", "--data-folder", "-d", help="Folder the media paths are relative to.")],
    output_file: Annotated[Optional[Path], typer.Option("--output-file", "-o", help="Experiment file to write [default: <file>_uploaded.jsonl].")] = None,
    overwrite_output: Annotated[bool, typer.Option("--overwrite-output", "-w", help="Replace the output file if it exists.")] = False,
    env_file: EnvFile = Path(".env"),
) -> None:
    """Upload the media of an experiment's gemini prompts once each, and write the
    experiment with each media part naming its upload (`uploaded_filename`)."""
    out = output_file or file.with_name(f"{file.stem}_uploaded.jsonl")
    if out.exists() and not overwrite_output:
        err.print(f"{out} exists; pass --overwrite-output (-w) to replace it, or choose --output-file", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    client = _gemini_client(env_file)
    report = _gemini_call(_files().upload_experiment_media(client, file, media_folder, out))  # the output is written last
    Console(soft_wrap=True).print(
        f"{report.files} media file(s): {report.uploaded} uploaded, {report.reused} already there; wrote {out}", highlight=False
    )


@upload_media.command("list")
def upload_media_list(env_file: EnvFile = Path(".env")) -> None:
    """List the files this key has uploaded, with their SHA-256."""
    client = _gemini_client(env_file)
    found = _gemini_call(_files().uploaded_by_hash(client))
    out = Console(soft_wrap=True)
    for digest, remote in sorted(found.items(), key=lambda kv: kv[1].name or ""):
        out.print(f"{remote.name}\t{remote.display_name or ''}\t{remote.mime_type or ''}\tsha256:{digest}", highlight=False, markup=False)
    out.print(f"{len(found)} file(s)", highlight=False)


@upload_media.command("delete")
def upload_media_delete(
    confirm_delete_all: Annotated[bool, typer.Option("--confirm-delete-all", help="Required: delete every uploaded file of this key.")] = False,
    env_file: EnvFile = Path(".env"),
) -> None:
    """Delete every file this key has uploaded."""
    if not confirm_delete_all:
        err.print("refusing to delete without --confirm-delete-all")
        raise typer.Exit(EXIT_BAD_INPUT)
    client = _gemini_client(env_file)
    Console().print(f"deleted {_gemini_call(_files().delete_all(client))} file(s)")


