"""The input folder as a work queue: find waiting files, claim one atomically, put it
back for a resume, or set a bad one aside with its error report. No Prefect here.

A claim is a rename into `input/.running/`, atomic on one filesystem, so two workers or
two overlapping polls never take the same file. The claim records its owner (host, pid):
a file whose owner died on this host is put back by the next poll and resumes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from promptfleet.experiment import EXTENSIONS
from promptfleet.rundir import now_stamp

RUNNING = ".running"


def running_folder(input_folder: Path) -> Path:
    return input_folder / RUNNING


def waiting_files(input_folder: Path) -> list[Path]:
    """Experiment files waiting in input/, oldest first (by modification time)."""
    if not input_folder.is_dir():
        return []
    files = [p for p in input_folder.iterdir() if p.is_file() and p.suffix in EXTENSIONS and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


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


def done(claimed: Path) -> None:
    """Forget the claim of a file whose run moved it to the output folder."""
    _owner_file(claimed).unlink(missing_ok=True)


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


def reject(claimed: Path, report: str, data_folder: Path) -> Path:
    """Move a file that cannot run to `rejected/`, with its error report next to it."""
    folder = data_folder / "rejected"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{now_stamp()}-{claimed.name}"
    os.rename(claimed, target)
    target.with_name(target.name + ".errors.txt").write_text(report + "\n")
    _owner_file(claimed).unlink(missing_ok=True)
    return target


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
