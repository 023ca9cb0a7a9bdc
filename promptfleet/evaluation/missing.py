"""The prompts of an experiment that have no answer yet, as a new experiment file
(prompto's `prompto_obtain_missing_jsonl`).

prompto matches input and answers by `id`. Our completed records also carry the
`input_line` they came from, so a file without ids can be matched by line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptfleet.core.experiment import ExperimentError, Issue, scan, write_records


@dataclass(frozen=True)
class Missing:
    total: int
    missing: int
    unreadable_answers: int


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _answered(completed: Path, id_key: str | None) -> tuple[set[str], set[int], int]:
    """(keys, input lines, unreadable lines) of a completed file. A torn or foreign line
    is counted, not fatal: its prompt simply counts as unanswered."""
    keys: set[str] = set()
    lines: set[int] = set()
    unreadable = 0
    with completed.open(encoding="utf-8", errors="replace") as fh:
        for text in fh:
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if not isinstance(record, dict) or "response" not in record:
                unreadable += 1
                continue
            if (id_key or "id") in record:
                keys.add(_key(record[id_key or "id"]))
            if id_key is None and isinstance(record.get("input_line"), int):
                lines.add(record["input_line"])
    return keys, lines, unreadable


def write_missing(experiment: Path, completed: Path, new: Path, id_key: str | None = None) -> Missing:
    """Write to `new` every record of `experiment` without an answer in `completed`.
    Nothing is written when no prompt is missing or when any input line is bad."""
    for path, flag in ((experiment, "--input"), (completed, "--output")):
        if not path.is_file():
            raise ExperimentError([Issue(str(path), 0, None, f"{flag}: file not found")])
    if new.suffix != ".jsonl":
        raise ExperimentError([Issue(str(new), 0, None, "--new: the new experiment file must end in .jsonl")])
    if new.resolve() in (experiment.resolve(), completed.resolve()):
        raise ExperimentError([Issue(str(new), 0, None, "--new must not be the input or the completed file")])
    keys, lines, unreadable = _answered(completed, id_key)

    def is_missing(line: int, record: dict[str, Any]) -> bool:
        if id_key is not None:
            return _key(record[id_key]) not in keys
        return _key(record["id"]) not in keys if "id" in record else line not in lines

    issues: list[Issue | str] = []
    total = missing = 0
    for item in scan(experiment):  # first pass: refuse a bad file before writing
        line, record = item.line, item.value
        if isinstance(record, Issue):
            issues.append(record)
        elif not isinstance(record, dict):
            issues.append(Issue(str(experiment), line, None, f"expected a JSON object, got {type(record).__name__}"))
        elif id_key is not None and id_key not in record:
            issues.append(Issue(str(experiment), line, id_key, "is required to match answers (see --id)"))
        else:
            total += 1
            missing += is_missing(line, record)
    if issues:
        raise ExperimentError(issues)
    if missing:
        write_records(new, (item.value for item in scan(experiment) if is_missing(item.line, item.value)))
    return Missing(total, missing, unreadable)
