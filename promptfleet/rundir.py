"""The output folder of a run: file names, the state file, the append-only journal and
the resume index.

The completed and failed files *are* the journal: one JSON line per finished prompt,
appended with a single unbuffered write, so a crash can cost at most a torn last line,
which the resume index cuts off.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


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
