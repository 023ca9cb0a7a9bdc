"""Experiment files: the record schema, a streaming reader and validation errors.

Records stay plain dicts from reading to output so that every key the user wrote is
carried through unchanged; the pydantic model only checks them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

EXTENSIONS = (".jsonl", ".csv")
CHAT_ROLES = {"system", "user", "assistant", "model"}


@dataclass(frozen=True)
class Issue:
    """One problem with one line of an experiment file."""

    file: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ExperimentError(Exception):
    """A file that cannot be run, with every issue found in it."""

    def __init__(self, issues: list[Issue | str]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class PromptRecord(BaseModel):
    """The keys promptfleet reads; any other key is allowed and carried to the output."""

    model_config = ConfigDict(extra="allow")

    prompt: Any
    api: str
    model_name: str
    id: Any = None
    parameters: dict[str, Any] = {}
    group: str | None = None
    multimedia: list[dict[str, Any]] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        check_prompt_shape(value)
        return value

    @field_validator("api", "model_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def check_prompt_shape(prompt: Any) -> None:
    """Accept a string, a non-empty list of strings, or a non-empty list of chat messages."""
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(
            "must be a string, a non-empty list of strings, or a non-empty list of "
            "{role, content} messages"
        )
    if all(isinstance(p, str) for p in prompt):
        return
    for n, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise ValueError(f"item {n} is a {type(message).__name__}: mix of strings and messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"message {n} has role {role!r}; expected one of {sorted(CHAT_ROLES)}")
        content = message.get("content", message.get("parts"))
        if not isinstance(content, (str, list, dict)):
            raise ValueError(f"message {n} has no 'content'")


def media_references(record: dict[str, Any]) -> Iterator[str]:
    """Local media paths a record points at (top-level `multimedia` and inside chat messages)."""
    for item in record.get("multimedia") or []:
        if isinstance(item, dict) and item.get("type", "image") != "text" and "media" in item:
            yield str(item["media"])
    prompt = record.get("prompt")
    if not isinstance(prompt, list):
        return
    for message in prompt:
        if not isinstance(message, dict):
            continue
        parts = message.get("content", message.get("parts"))
        for part in parts if isinstance(parts, list) else [parts]:
            if not isinstance(part, dict):
                continue
            if part.get("type") in ("image", "file") and "media" in part:
                yield str(part["media"])
            elif part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if isinstance(url, str) and not url.startswith(("http://", "https://", "data:")):
                    yield url


def check_media(record: dict[str, Any], media_dir: Path) -> str | None:
    """Refuse media that is missing or outside the media folder (a path must not escape it)."""
    root = media_dir.resolve()
    for ref in media_references(record):
        path = (root / ref).resolve()
        if not path.is_relative_to(root):
            return f"media file {ref!r} is outside the media folder {media_dir}"
        if not path.is_file():
            return f"media file {ref!r} not found in {media_dir}"
    return None


def _validate(raw: Any, file: str, line: int, media_dir: Path | None, known_apis: set[str] | None) -> Issue | None:
    if not isinstance(raw, dict):
        return Issue(file, line, None, f"expected a JSON object, got {type(raw).__name__}")
    try:
        record = PromptRecord.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        message = "is required" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        if first["type"] == "dict_type":
            message = "must be an object"
        return Issue(file, line, field, message)
    if known_apis is not None and record.api not in known_apis:
        return Issue(file, line, "api", f"unknown api {record.api!r}; known: {', '.join(sorted(known_apis))}")
    if media_dir is not None and (problem := check_media(raw, media_dir)):
        return Issue(file, line, "multimedia", problem)
    return None


def _raw_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed value or Issue) without holding the file in memory."""
    file = str(path)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            start = 2
            for row in reader:
                yield start, _from_csv_row(row)
                start = reader.line_num + 1
        return
    with path.open(encoding="utf-8") as fh:
        for n, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as err:
                yield n, Issue(file, n, None, f"invalid JSON: {err.msg} at column {err.colno}")


def _from_csv_row(row: dict[str, str]) -> dict[str, Any]:
    """CSV rows spell parameters as `parameters-<name>` columns; values are JSON where they parse."""
    record: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    for key, value in row.items():
        if key is None or value is None or value == "":
            continue
        if key.startswith("parameters-"):
            try:
                parameters[key.removeprefix("parameters-")] = json.loads(value)
            except json.JSONDecodeError:
                parameters[key.removeprefix("parameters-")] = value
        else:
            record[key] = value
    if parameters:
        record["parameters"] = parameters
    return record


def read_records(
    path: Path, media_dir: Path | None = None, known_apis: set[str] | None = None
) -> Iterator[tuple[int, dict[str, Any] | Issue]]:
    """Stream (line, record) pairs; a bad line comes as an Issue in place of its record."""
    for line, raw in _raw_lines(path):
        if isinstance(raw, Issue):
            yield line, raw
            continue
        issue = _validate(raw, str(path), line, media_dir, known_apis)
        yield line, issue or raw


def iter_valid(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records of a file that was already validated (no schema work on the hot path)."""
    for line, raw in _raw_lines(path):
        if isinstance(raw, dict):
            yield line, raw


def check_extension(path: Path) -> None:
    if path.suffix not in EXTENSIONS:
        raise ExperimentError([Issue(str(path), 0, None, "experiment files must end in .jsonl or .csv")])
    if not path.is_file():
        raise ExperimentError([Issue(str(path), 0, None, "file not found")])
