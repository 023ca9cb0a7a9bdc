"""The input folder as a work queue, and the one module that moves input files: find
settled waiting files, claim one atomically, place a run's working copy next to its
outputs, put a file back for a resume, or set a bad one aside with its error report.

A claim is a rename into `input/.running/`, atomic on one filesystem, so two workers or
two overlapping polls never take the same file. The claim records its owner (host, pid):
a file whose owner died on this host is put back by the next poll and resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from promptfleet.experiment import EXTENSIONS
from promptfleet.rundir import RunBusy, RunLock, RunPaths, now_stamp

RUNNING = ".running"


def running_folder(input_folder: Path) -> Path:
    return input_folder / RUNNING


def waiting_files(input_folder: Path, settle_seconds: float = 0.0) -> list[Path]:
    """Experiment files waiting in input/ and complete, oldest first.

    A file is complete when nothing has written to it for `settle_seconds` (its ctime,
    which copies cannot back-date) and, for JSONL, it ends with a newline. Writers that
    cannot promise either write `name.jsonl.part` (or a dot-file) and rename it when done."""
    if not input_folder.is_dir():
        return []
    now = time.time()
    files = []
    for path in input_folder.iterdir():
        if path.name.startswith(".") or path.suffix not in EXTENSIONS or not path.is_file():
            continue
        stat = path.stat()
        if now - max(stat.st_mtime, stat.st_ctime) < settle_seconds or not _ends_complete(path, stat.st_size):
            continue
        files.append((stat.st_mtime, path.name, path))
    return [path for _, _, path in sorted(files)]


def _ends_complete(path: Path, size: int) -> bool:
    if path.suffix != ".jsonl" or size == 0:
        return size > 0
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def claim(path: Path) -> Path | None:
    """Take a waiting file for this process, or None if someone else was faster."""
    running = running_folder(path.parent)
    running.mkdir(exist_ok=True)
    target = running / path.name
    if target.exists():  # the same name is already running: leave this one waiting
        return None
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    _owner_file(target).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return target


def release(claimed: Path) -> Path:
    """Put an unfinished file back in input/; re-running it resumes where it stopped."""
    back = claimed.parent.parent / claimed.name
    os.rename(claimed, back)
    _owner_file(claimed).unlink(missing_ok=True)
    return back


def requeue_orphans(input_folder: Path) -> list[Path]:
    """Put back files claimed by processes of this host that no longer exist."""
    running = running_folder(input_folder)
    requeued = []
    for owner in running.glob(".*.owner") if running.is_dir() else []:
        try:
            info = json.loads(owner.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        claimed = running / owner.name.removeprefix(".").removesuffix(".owner")
        if info.get("host") == socket.gethostname() and not _alive(info.get("pid", -1)) and claimed.exists():
            requeued.append(release(claimed))
    return requeued


def requeue_stranded(input_folder: Path, output_folder: Path) -> list[Path]:
    """Put back inbox files whose run a dead process left unfinished (a worker killed with
    -9, a host that went down): the run's state names a claim in `.running/`, its working
    copy sits next to its outputs, and nobody holds its lock (the OS drops a dead process's
    flock). Works across hosts as far as the shared filesystem's flock does."""
    running = running_folder(input_folder).resolve()
    requeued = []
    for state_file in output_folder.glob("*/*-run-*.json") if output_folder.is_dir() else []:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        source = Path(str(state.get("source", "")))
        if state.get("finished") or source.parent.resolve() != running or (input_folder / source.name).exists():
            continue
        stamp, _, name = state_file.name.removesuffix(".json").partition("-run-")
        working = RunPaths(state_file.parent, stamp, name, source.suffix).input
        lock = RunLock(state_file.parent)
        try:
            lock.acquire()
        except RunBusy:
            continue  # its run is alive
        try:
            if working.exists():
                requeued.append(give_back(working, input_folder, source.name))
        finally:
            lock.release()
    return requeued


def reject(claimed: Path, report: str, data_folder: Path) -> Path:
    """Move a file that cannot run to `rejected/`, with its error report next to it."""
    folder = data_folder / "rejected"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{now_stamp()}-{claimed.name}"
    os.rename(claimed, target)
    target.with_name(target.name + ".errors.txt").write_text(report + "\n")
    _owner_file(claimed).unlink(missing_ok=True)
    return target


def place_working_copy(source: Path, target: Path, move: bool = False) -> None:
    """Put a run's input next to its outputs (prompto's `-input-` file) before sending: a
    copy written under a temporary name and renamed, or the file itself with -m."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if move:
        shutil.move(source, target)
        _owner_file(source).unlink(missing_ok=True)
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def give_back(working_copy: Path, input_folder: Path, name: str) -> Path:
    """An unfinished run of an inbox file returns it to the inbox, to be resumed."""
    back = input_folder / name
    shutil.move(working_copy, back)
    return back


def _owner_file(claimed: Path) -> Path:
    return claimed.with_name(f".{claimed.name}.owner")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
