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
from promptfleet.core.nesting import MAX_DEPTH, field_too_deep_in_text, too_deep_field
from promptfleet.core.rundir import output_name_problem, parse_line

EXTENSIONS = (".jsonl", ".csv")


_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


@dataclass(frozen=True)
class Issue:
    """One problem with one line of an experiment file."""

    file: str
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        file = self.file.translate(_ESCAPED) if not self.file.isprintable() else self.file  # a name with a newline stays one line
        where = f"{file}:{self.line}" if self.line else file
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
            yield Scanned(n, start, len(raw), record_key(body), _parse_line(text, file, n))


def _parse_line(text: str, file: str, line: int) -> Any:
    """The record of one JSONL line, or the Issue saying why it is not one."""
    try:
        value = loads(text)
    except json.JSONDecodeError as err:
        return Issue(file, line, None, f"invalid JSON: {_json_problem(err)}")
    except NotFinite as err:
        return Issue(file, line, None, str(err))
    except RecursionError:  # the json module gives up near Python's recursion limit
        return Issue(file, line, field_too_deep_in_text(text), TOO_DEEP)
    if isinstance(value, dict) and (field := too_deep_field(value, text)):
        return Issue(file, line, field, TOO_DEEP)
    return value


TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep; flatten it"


class NotFinite(ValueError):
    """NaN, Infinity, or a number beyond a float: Python's json reads them, JSON has none."""


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise NotFinite(f"invalid JSON: the number {text[:30]} is too large; write it as a string, or a smaller number")
    return value


def _no_constant(name: str) -> Any:
    raise NotFinite(f"invalid JSON: {name} is not a JSON value; write it as a string or null")


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)  # stateless; built once, not per line


def loads(text: str) -> Any:
    """json.loads, refusing what only Python's json reads (NaN, Infinity, 1e999)."""
    return _DECODER.decode(text)


def _json_problem(err: json.JSONDecodeError) -> str:
    # the json module ends some messages in "at" ("Invalid control character at")
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


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
            value = _from_csv_row(dict(zip(header, values)), file, first)
        yield Scanned(first, begin, len(raw), record_key(raw), value)


JSON_COLUMNS = ("response_schema", "multimedia")  # CSV cells holding JSON, like a JSONL line's values


class _CellProblem(ValueError):
    pass


def _from_csv_row(row: dict[str, str], file: str = "", line: int = 0) -> dict[str, Any] | Issue:
    """CSV rows spell parameters as `parameters-<name>` columns, whose values are JSON where
    they parse and text otherwise; the JSON columns must hold JSON."""
    record: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    for key, value in row.items():
        if value is None or value == "":
            continue
        try:
            if key.startswith("parameters-"):
                parameters[key.removeprefix("parameters-")] = _cell(value, strict=False)
            elif key in JSON_COLUMNS:
                record[key] = _cell(value, strict=True)
            else:
                record[key] = value
        except _CellProblem as problem:
            return Issue(file, line, key, str(problem))
    if parameters:
        record["parameters"] = parameters
    return record


def _cell(text: str, strict: bool) -> Any:
    try:
        value = loads(text)
    except (json.JSONDecodeError, NotFinite) as err:
        if strict:
            raise _CellProblem(f"the cell must hold JSON: {_json_problem(err) if isinstance(err, json.JSONDecodeError) else err}") from None
        return text
    except RecursionError:
        raise _CellProblem(TOO_DEEP) from None
    if too_deep_field({"cell": value}, text):
        raise _CellProblem(TOO_DEEP)
    return value


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
            return parse_line(raw)  # the same record as json reads it, ~3x faster: read once a prompt
        values = next(csv.reader(io.StringIO(raw.decode("utf-8"))))
        record = _from_csv_row(dict(zip(self._csv_header, values)))
        if isinstance(record, Issue):  # planned records were valid when planned
            raise ExperimentError([record])
        return record

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
    """Refuse, in one line, a path that cannot be an experiment: its kind, its name (which
    names its output folder), or what is there."""
    if path.suffix not in EXTENSIONS:
        raise ExperimentError([Issue(str(path), 0, None, "experiment files must end in .jsonl or .csv")])
    if problem := output_name_problem(path.stem):
        raise ExperimentError([Issue(str(path), 0, None, problem)])
    if path.is_dir():
        raise ExperimentError([Issue(str(path), 0, None, "is a folder; -f names an experiment file")])
    if not path.exists():
        raise ExperimentError([Issue(str(path), 0, None, "file not found")])
    if not path.is_file():
        raise ExperimentError([Issue(str(path), 0, None, "is not a regular file (a FIFO, socket or device); copy it to a file first")])


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
