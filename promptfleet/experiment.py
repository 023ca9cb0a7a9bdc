"""Experiment files: the record schema, a streaming reader and validation errors.

Records stay plain dicts from reading to output so that every key the user wrote is
carried through unchanged; the pydantic model only checks them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from promptfleet.media import MediaError, MediaFolder
from promptfleet.messages import Conversation, LocalMedia, PromptError, parse_conversation

EXTENSIONS = (".jsonl", ".csv")


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
        parse_conversation(value)
        return value

    @field_validator("api", "model_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


MediaCheck = Callable[[dict[str, Any], Conversation], "str | None"]


def check_media(conversation: Conversation, media: MediaFolder) -> str | None:
    """Refuse local media that is missing or resolves outside the media folder."""
    for part in conversation.media:
        if isinstance(part, LocalMedia):
            try:
                media.resolve(part.ref)
            except MediaError as err:
                return str(err)
    return None


def _validate(
    raw: Any, file: str, line: int, media: MediaFolder | None, known_apis: set[str] | None, check: MediaCheck | None
) -> Issue | None:
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
    try:
        conversation = parse_conversation(raw["prompt"], raw.get("multimedia"))
    except PromptError as err:
        return Issue(file, line, "multimedia", str(err))
    if media is not None and (problem := check_media(conversation, media)):
        return Issue(file, line, "multimedia", problem)
    if check is not None and (problem := check(raw, conversation)):
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
    path: Path, media_dir: Path | None = None, known_apis: set[str] | None = None, check: MediaCheck | None = None
) -> Iterator[tuple[int, dict[str, Any] | Issue]]:
    """Stream (line, record) pairs; a bad line comes as an Issue in place of its record.
    `check` lets the caller refuse media a record's provider cannot take."""
    media = MediaFolder(media_dir) if media_dir is not None else None
    for line, raw in _raw_lines(path):
        if isinstance(raw, Issue):
            yield line, raw
            continue
        issue = _validate(raw, str(path), line, media, known_apis, check)
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
