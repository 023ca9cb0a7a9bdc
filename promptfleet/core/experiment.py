"""Experiment files: the record schema, a streaming reader and validation errors.

Records stay plain dicts from reading to output so that every key the user wrote is
carried through unchanged; the pydantic model only checks them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from promptfleet.core.media import MediaError, MediaFolder
from promptfleet.core.messages import (
    Conversation,
    LocalMedia,
    PromptError,
    parse_conversation,
)

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


BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Scanned:
    line: int
    offset: int
    length: int
    key: bytes
    value: Any  # the record dict, or an Issue


def record_key(raw: bytes) -> bytes:
    return hashlib.blake2b(raw.removeprefix(BOM).strip(), digest_size=12).digest()


def scan(path: Path, digest: Any = None) -> Iterator[Scanned]:
    """Stream a JSONL or CSV file once: each record (or Issue) with its place and key.
    `digest` (a hashlib object) is fed every byte on the way."""
    if path.suffix == ".csv":
        yield from _scan_csv(path, digest)
        return
    file = str(path)
    offset = 0
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if digest is not None:
                digest.update(raw)
            start, offset = offset, offset + len(raw)
            body = raw.removeprefix(BOM) if n == 1 else raw
            if not body.strip():
                continue
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Scanned(n, start, len(raw), b"", Issue(file, n, None, _not_utf8(err)))
                continue
            try:
                value: Any = json.loads(text)
            except json.JSONDecodeError as err:
                value = Issue(file, n, None, f"invalid JSON: {err.msg} at column {err.colno}")
            yield Scanned(n, start, len(raw), record_key(body), value)


def _not_utf8(err: UnicodeDecodeError) -> str:
    return f"not UTF-8 text: byte 0x{err.object[err.start]:02x} at column {err.start + 1}"


def _scan_csv(path: Path, digest: Any) -> Iterator[Scanned]:
    file = str(path)
    consumed = 0
    chunks: list[bytes] = []
    bad: dict[int, str] = {}
    physical = 0

    def lines() -> Iterator[str]:
        nonlocal consumed, physical
        with path.open("rb") as fh:
            for raw in fh:
                physical += 1
                if digest is not None:
                    digest.update(raw)
                consumed += len(raw)
                chunks.append(raw)
                body = raw.removeprefix(BOM) if physical == 1 else raw
                try:
                    yield body.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad[physical] = _not_utf8(err)
                    yield body.decode("utf-8", errors="replace")

    reader = csv.reader(lines())
    header = next(reader, None)
    if header is None:
        return
    last_line = reader.line_num
    chunks.clear()
    start = consumed
    for values in reader:
        first, last_line = last_line + 1, reader.line_num
        raw = b"".join(chunks)
        chunks.clear()
        begin, start = start, consumed
        if not values:
            continue
        problem = next((bad[n] for n in range(first, last_line + 1) if n in bad), None)
        if problem:
            value: Any = Issue(file, first, None, problem)
        elif len(values) > len(header):
            value = Issue(file, first, None, f"row has {len(values)} cells but the header names {len(header)} columns")
        else:
            value = _from_csv_row(dict(zip(header, values)))
        yield Scanned(first, begin, len(raw), record_key(raw), value)


def _from_csv_row(row: dict[str, str]) -> dict[str, Any]:
    """CSV rows spell parameters as `parameters-<name>` columns; values are JSON where they parse."""
    record: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    for key, value in row.items():
        if value is None or value == "":
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


class RecordReader:
    """Reads planned records back by offset through one open file, for every queue."""

    def __init__(self, path: Path):
        self._csv_header: list[str] | None = None
        self._fd = os.open(path, os.O_RDONLY)
        if path.suffix == ".csv":
            with open(self._fd, "rb", closefd=False) as fh:
                self._csv_header = next(csv.reader([fh.readline().removeprefix(BOM).decode("utf-8")]))

    def read(self, offset: int, length: int) -> dict[str, Any]:
        raw = os.pread(self._fd, length, offset).removeprefix(BOM)
        if self._csv_header is None:
            return json.loads(raw)
        values = next(csv.reader(io.StringIO(raw.decode("utf-8"))))
        return _from_csv_row(dict(zip(self._csv_header, values)))

    def close(self) -> None:
        os.close(self._fd)


def validated(
    path: Path, media_dir: Path | None = None, known_apis: set[str] | None = None, check: MediaCheck | None = None, digest: Any = None
) -> Iterator[Scanned]:
    """`scan`, with each record checked against the schema, the apis and the media rules."""
    media = MediaFolder(media_dir) if media_dir is not None else None
    file = str(path)
    for item in scan(path, digest):
        if isinstance(item.value, Issue):
            yield item
            continue
        issue = _validate(item.value, file, item.line, media, known_apis, check)
        yield Scanned(item.line, item.offset, item.length, item.key, issue) if issue else item


def iter_valid(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records of a file that was already validated (no schema work)."""
    for item in scan(path):
        if isinstance(item.value, dict):
            yield item.line, item.value


def check_extension(path: Path) -> None:
    if path.suffix not in EXTENSIONS:
        raise ExperimentError([Issue(str(path), 0, None, "experiment files must end in .jsonl or .csv")])
    if not path.is_file():
        raise ExperimentError([Issue(str(path), 0, None, "file not found")])


def write_records(out: Path, records: Iterator[dict[str, Any]]) -> int:
    """Write an experiment file whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return count
