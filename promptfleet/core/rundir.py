"""The output folder of a run: file names, the state file, the append-only journal and
the resume index.

The completed and failed files *are* the journal: one JSON line per finished prompt,
appended with a single unbuffered write, so a crash can cost at most a torn last line,
which resuming sets aside.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

TIMESTAMP_FORMAT = "%d-%m-%Y-%H-%M-%S"  # prompto's, so output names sort and read the same


def now_stamp() -> str:
    """Local time to the second; `time.strftime` (~1 us) rather than a datetime (~5 us): every prompt is stamped."""
    return time.strftime(TIMESTAMP_FORMAT)


MAX_NAME_BYTES = 180  # the longest output file name adds ~50 bytes; file systems stop at 255


def output_name_problem(name: str) -> str | None:
    """Why an experiment's name (its file name less .jsonl/.csv) cannot name its output
    folder `output/<name>/` and the files in it, if it cannot. Every other name, spaces
    and accents included, is used as it is."""
    if not name.strip("."):  # "", ".", "..": the output would land in output/ or data/ itself
        return f"the name {name!r} cannot name an output folder; rename the file (e.g. to experiment.jsonl)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "the file name holds control characters (a newline, a tab...); rename the file"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8; rename the file"
    if size > MAX_NAME_BYTES:
        return f"the file name is {size} bytes long; output file names add ~50 to it, and file systems stop at 255: rename it to at most {MAX_NAME_BYTES} bytes"
    return None


def write_problem(out_dir: Path, need: int = 0) -> str | None:
    """Why a run could not write under `out_dir`, if it could not: a read-only folder or
    disk, a folder of someone else's, or less than `need` bytes free. Probed by writing
    (and removing) a small file in the nearest folder that exists, so `check` says what
    `run` would meet; nothing is left behind."""
    import tempfile

    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe}: is not a folder; the run writes its output under {out_dir}"
    try:
        fd, name = tempfile.mkstemp(prefix=".promptfleet-write-probe-", dir=probe)
        try:
            os.write(fd, b"\n" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
        stat = os.statvfs(probe)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{probe}: its disk is full ({err.strerror}); free space, or choose another data folder with -d"
        return f"{probe}: cannot write there ({err.strerror}); make it writable, or choose another data folder with -d"
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        return (
            f"{probe}: {_size(free)} free on its disk, this run needs at least {_size(need)} (a copy of the input and the answers); "
            "free space, or choose another data folder with -d"
        )
    return None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


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
    def batches(self) -> Path:
        """The batch journal (batch mode): which provider batch holds which lines."""
        return self._file("batches")

    @property
    def log(self) -> Path:
        return self._file("log", ".txt")

    @property
    def state(self) -> Path:
        return self._file("run", ".json")

    @property
    def manifest(self) -> Path:
        return self._file("manifest", ".json")

    @property
    def parquet(self) -> Path:
        return self._file("results", ".parquet")

    @property
    def csv(self) -> Path:
        return self._file("completed", ".csv")


def unfinished_runs(out_dir: Path, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(stamp, state) of the interrupted runs of this experiment, newest first."""
    found = []
    suffix = f"-run-{name}.json"  # matched as text: a name may hold glob characters ("a[1]")
    for state_file in (f for f in out_dir.iterdir() if f.name.endswith(suffix)) if out_dir.is_dir() else []:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not state.get("finished"):
            found.append((state_file.name.removesuffix(suffix), state))
    return sorted(found, key=lambda item: item[1].get("started", ""), reverse=True)


class RunBusy(Exception):
    """Another process owns this experiment's runs."""


class RunLock:
    """One owner at a time per experiment: an flock on `<out_dir>/.lock`, held for the run's
    life and released by the OS when the process dies, even by kill -9. The file says who
    holds it, for the refusal message."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False, on_wait: Any = None) -> None:
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self.owner()
            if not wait:
                os.close(fd)
                raise RunBusy(owner) from None
            if on_wait:
                on_wait(owner)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def owner(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


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

    O_APPEND and one os.write per record keep lines whole even when several queues append at
    once. A record always starts on a fresh line: if the file does not end in a newline (a
    write torn by a full disk or a crash), one is written first, so a torn record never
    swallows the next. The run's owner (RunLock) is its only writer, so the file's end is
    read only until this journal has written a whole record, and again after a failed write.
    Data is fsynced at most once a second: a power cut can lose that last second, a killed
    process loses nothing the OS accepted.
    """

    def __init__(self, paths: RunPaths, sync_interval: float = 1.0, on_error: Callable[[OSError], None] | None = None):
        paths.out_dir.mkdir(parents=True, exist_ok=True)
        self._on_error = on_error
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT  # read too: to see how the file ends
        self._fds = {"completed": os.open(paths.completed, flags, 0o644), "failed": os.open(paths.failed, flags, 0o644)}
        self._ends_whole = {"completed": False, "failed": False}  # known only once this journal wrote the end itself
        self._encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps would make one a record
        self._sync_interval = sync_interval
        self._last_sync = time.monotonic()

    def write(self, kind: str, record: dict[str, Any]) -> bool:
        """Append one record; False when it could not be written. A failed write (disk full,
        I/O error) goes to `on_error`, which stops the run: the record's prompt stays
        unanswered for the resume."""
        data = (self._encode(record) + "\n").encode()
        fd = self._fds[kind]
        try:
            if not self._ends_whole[kind] and (size := os.fstat(fd).st_size) and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            self._ends_whole[kind] = False  # until the whole record is in
            self._append(fd, data)
            self._ends_whole[kind] = True
            if time.monotonic() - self._last_sync > self._sync_interval:
                self.sync()
        except OSError as err:
            if self._on_error is None:
                raise
            self._on_error(err)
            return False
        return True

    @staticmethod
    def _append(fd: int, data: bytes) -> None:
        while data:
            data = data[os.write(fd, data) :]

    def sync(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._fds:
            return
        try:
            self.sync()
        except OSError as err:  # answers may not have reached the disk
            if self._on_error is not None:
                self._on_error(err)
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


@dataclass
class JournalIndex:
    """What a run's journal says is done: how many records of each key."""

    keys: dict[str, int] = field(default_factory=dict)
    corrupt: int = 0


# How the journal's encoder ends a record of the engine: `..., "input_key": "<24 hex>"}\n`.
_KEY_AT_END, _KEY_END = b', "input_key": "', b'"}\n'
_KEY_FROM, _KEY_TO = -len(_KEY_END) - 24, -len(_KEY_END)  # the key's place from the line's end
_KEY_NAMED = -len(_KEY_END) - 24 - len(_KEY_AT_END)  # where its name starts


def read_journal(paths: RunPaths, progress: Callable[[int], None] | None = None) -> JournalIndex:
    """Every journal line's key. A line that is not a JSON record (a torn write) is set aside
    into `<file>.corrupt` and its prompt counts as unanswered, so resuming is never blocked.
    `progress` hears how many records were read, about once a second. Streams: memory holds
    the index, never the journal.

    A line that ends as the engine's records end is taken as the record it is without being
    parsed (~3 µs a line: 1.5 s of a million-prompt resume). A write cut short (a kill, a full
    disk) leaves the beginning of a record, which the next write ends with a newline; the key
    being a record's last field, such a line cannot end as a whole record does, so it is parsed,
    found torn and set aside. Any other line is parsed too."""
    done = JournalIndex()
    keys, count, loads = done.keys, done.keys.get, orjson.loads
    read, report_at = 0, time.monotonic() + 1.0
    for path in (paths.completed, paths.failed):
        if not path.exists():
            continue
        bad = 0
        raw = b""
        with path.open("rb", buffering=1 << 20) as fh:
            for raw in fh:  # this loop runs a million times before a resumed run sends: kept lean
                if raw[_KEY_NAMED:_KEY_FROM] == _KEY_AT_END and raw[_KEY_TO:] == _KEY_END and raw[:1] == b"{":
                    key = raw[_KEY_FROM:_KEY_TO].decode()
                else:
                    try:
                        record = loads(raw)
                    except orjson.JSONDecodeError:
                        record = _journal_record(raw)
                    if type(record) is not dict or "input_line" not in record:
                        bad += bool(raw.strip())
                        continue
                    key = record.get("input_key")
                if key:
                    keys[key] = count(key, 0) + 1
                read += 1
                if progress is not None and not read % 10_000 and time.monotonic() >= report_at:
                    progress(read)
                    report_at = time.monotonic() + 1.0
        ends_whole = not raw or raw.endswith(b"\n")
        if bad or not ends_whole:  # a whole last record may lack only its newline
            _set_aside_torn(path)
            done.corrupt += bad
    return done


def parse_line(raw: bytes) -> Any:
    """One JSON line: orjson (~3x faster), or json for what orjson refuses (NaN, integers
    past 64 bits), which `json.dumps` writes."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _journal_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = parse_line(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "input_line" in record else None


def _set_aside_torn(path: Path) -> None:
    """Rewrite the journal with its records only, each ending in a newline; the lines that
    are not records go to `<file>.corrupt`. A second pass, so no line is held in memory."""
    tmp = path.with_name(f".{path.name}.tmp")
    corrupt = None
    try:
        with path.open("rb") as fh, open(tmp, "wb") as good:
            for raw in fh:
                line = raw if raw.endswith(b"\n") else raw + b"\n"
                if _journal_record(raw) is not None:
                    good.write(line)
                elif raw.strip():
                    corrupt = corrupt or open(str(path) + ".corrupt", "ab")
                    corrupt.write(line)
            good.flush()
            os.fsync(good.fileno())
    finally:
        if corrupt is not None:
            corrupt.close()
    os.replace(tmp, path)
