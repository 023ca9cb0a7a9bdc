"""The output folder of a run: file names, the append-only journal, the resume index
and the result tables.

The completed and failed files *are* the journal: one JSON line per finished prompt,
appended with a single unbuffered write, so a crash can cost at most a torn last line,
which the resume index cuts off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

TIMESTAMP_FORMAT = "%d-%m-%Y-%H-%M-%S"  # prompto's, so output names sort and read the same


def now_stamp() -> str:
    return datetime.now().strftime(TIMESTAMP_FORMAT)


@dataclass(frozen=True)
class RunPaths:
    out_dir: Path
    stamp: str
    name: str
    input_suffix: str = ".jsonl"

    def _file(self, kind: str, suffix: str = ".jsonl") -> Path:
        return self.out_dir / f"{self.stamp}-{kind}-{self.name}{suffix}"

    @property
    def input(self) -> Path:
        return self._file("input", self.input_suffix)

    @property
    def completed(self) -> Path:
        return self._file("completed")

    @property
    def failed(self) -> Path:
        return self._file("failed")

    @property
    def log(self) -> Path:
        return self._file("log", ".txt")

    @property
    def state(self) -> Path:
        return self._file("run", ".json")

    @property
    def parquet(self) -> Path:
        return self._file("results", ".parquet")

    @property
    def csv(self) -> Path:
        return self._file("completed", ".csv")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def find_unfinished(out_dir: Path, name: str, digest: str) -> str | None:
    """The stamp of an interrupted run of this exact input, if there is one."""
    for state_file in sorted(out_dir.glob(f"*-run-{name}.json"), reverse=True):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not state.get("finished") and state.get("input_sha256") == digest:
            return state_file.name.removesuffix(f"-run-{name}.json")
    return None


def write_state(paths: RunPaths, **state: Any) -> None:
    """Replace the run's state file atomically (write then rename)."""
    paths.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, paths.state)


def read_state(paths: RunPaths) -> dict[str, Any]:
    return json.loads(paths.state.read_text())


class Journal:
    """Append-only completed/failed files shared by every queue of a run.

    O_APPEND and one os.write per record keep lines whole even when several queues or
    processes append at once. Data is fsynced at most once a second: a power cut can lose
    that last second, a killed process loses nothing the OS accepted.
    """

    def __init__(self, paths: RunPaths, sync_interval: float = 1.0):
        paths.out_dir.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._fds = {"completed": os.open(paths.completed, flags, 0o644), "failed": os.open(paths.failed, flags, 0o644)}
        self._sync_interval = sync_interval
        self._last_sync = time.monotonic()

    def write(self, kind: str, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = self._fds[kind]
        while data:
            data = data[os.write(fd, data):]
        if time.monotonic() - self._last_sync > self._sync_interval:
            self.sync()

    def sync(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _repair_tail(path: Path) -> None:
    """Cut a torn last line left by a crash mid-write, so the file stays valid JSONL."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        size = fh.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(65536, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                fh.truncate(pos - step + cut + 1)
                return
            pos -= step
        fh.truncate(0)


def finished_lines(paths: RunPaths) -> set[int]:
    """Input lines already answered or failed in this run (both count: nothing is sent twice)."""
    done: set[int] = set()
    for path in (paths.completed, paths.failed):
        _repair_tail(path)
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as fh:
            for text in fh:
                done.add(json.loads(text)["input_line"])
    return done


TABLE_SCHEMA = {
    "input_line": pl.Int64,
    "id": pl.String,
    "api": pl.String,
    "model_name": pl.String,
    "group": pl.String,
    "status": pl.String,
    "prompt": pl.String,
    "response": pl.String,
    "timestamp_sent": pl.String,
    "latency_s": pl.Float64,
    "attempts": pl.Int64,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "finish_reason": pl.String,
    "error_type": pl.String,
    "error_status": pl.Int64,
    "error_message": pl.String,
    "parameters": pl.String,
}


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _row(record: dict[str, Any], status: str, score_keys: list[str]) -> dict[str, Any]:
    usage = record.get("usage") or {}
    error = record.get("error") or {}
    return {
        "input_line": record.get("input_line"),
        "id": _as_text(record.get("id")),
        "api": record.get("api"),
        "model_name": record.get("model_name"),
        "group": record.get("group"),
        "status": status,
        "prompt": _as_text(record.get("prompt")),
        "response": _as_text(record.get("response")),
        "timestamp_sent": record.get("timestamp_sent"),
        "latency_s": record.get("latency_s"),
        "attempts": record.get("attempts", error.get("attempts")),
        "input_tokens": usage.get("input_tokens"),
        "output_tokens": usage.get("output_tokens"),
        "finish_reason": record.get("finish_reason"),
        "error_type": error.get("type"),
        "error_status": error.get("status"),
        "error_message": error.get("message"),
        "parameters": _as_text(record.get("parameters")),
        **{f"score_{k}": _score(record.get(k)) for k in score_keys},
    }


def _score(value: Any) -> float | None:
    """Scores in the table are numbers (True is 1) so they average; others stay in the JSONL."""
    return float(value) if isinstance(value, (bool, int, float)) else None


def write_tables(paths: RunPaths, csv: bool = False, score_keys: list[str] = (), batch: int = 20_000) -> pl.DataFrame:
    """Parquet (and CSV) of every prompt in the run, one row each (answers, then failures, as they
    landed; `input_line` gives the input order); returns a per-model summary.

    Rows go to Parquet parts `batch` at a time, which polars then streams into one file, so a
    million-line run needs the memory of one batch (polars' NDJSON reader would hold it all).
    """
    schema = TABLE_SCHEMA | {f"score_{k}": pl.Float64 for k in score_keys}
    parts = paths.out_dir / f".{paths.stamp}-table-{paths.name}"
    parts.mkdir(exist_ok=True)
    try:
        rows: list[dict[str, Any]] = []
        written = 0
        for path, status in ((paths.completed, "completed"), (paths.failed, "failed")):
            if not path.exists():
                continue
            with path.open(encoding="utf-8") as fh:
                for text in fh:
                    rows.append(_row(json.loads(text), status, list(score_keys)))
                    if len(rows) == batch:
                        pl.DataFrame(rows, schema=schema).write_parquet(parts / f"{written:06d}.parquet")
                        written, rows = written + 1, []
        pl.DataFrame(rows, schema=schema).write_parquet(parts / f"{written:06d}.parquet")
        table = pl.scan_parquet(parts / "*.parquet")
        table.sink_parquet(paths.parquet)
        if csv:
            table.sink_csv(paths.csv)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    return summarise(pl.scan_parquet(paths.parquet), score_keys)


def summarise(table: pl.LazyFrame, score_keys: list[str] = ()) -> pl.DataFrame:
    return (
        table.group_by("api", "model_name")
        .agg(
            pl.len().alias("prompts"),
            (pl.col("status") == "completed").sum().alias("answered"),
            (pl.col("status") == "failed").sum().alias("failed"),
            pl.col("latency_s").median().alias("latency_p50_s"),
            pl.col("latency_s").quantile(0.95).alias("latency_p95_s"),
            pl.col("input_tokens").sum().alias("input_tokens"),
            pl.col("output_tokens").sum().alias("output_tokens"),
            *(pl.col(f"score_{k}").mean().alias(f"mean_{k}") for k in score_keys),
        )
        .sort("api", "model_name")
        .collect()
    )
