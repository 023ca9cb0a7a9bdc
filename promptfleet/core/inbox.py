"""The input folder as a work queue, and the one module that moves input files: find
settled waiting files, claim one atomically, place a run's working copy next to its
outputs, put a file back for a resume, or set a bad one aside with its error report.

`take` is the one claim every entry point goes through — `promptfleet run`, a
`run-experiment` deployment run, a poll: an inbox file is claimed out of the inbox, and
the experiment's run lock taken; whoever comes second is told who has the work, or that it
is done, and does nothing.

A claim is a rename into `input/.running/`, atomic on one filesystem, so two workers or
two overlapping polls never take the same file. The claim holds a lease (promptfleet.core.lease)
in `.running/.NAME.owner`, renewed for as long as the file's run goes on: a poll on any
host puts back a claim whose lease expired, and at once one whose process died on its own
host; the file then resumes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from promptfleet.core.experiment import EXTENSIONS
from promptfleet.core.lease import (
    Clock,
    Holder,
    SystemClock,
    done_taking_over,
    read_lease,
    take_over,
)
from promptfleet.core.rundir import RunBusy, RunLock, RunPaths, now_stamp

if TYPE_CHECKING:
    from promptfleet.core.config import Settings

RUNNING = ".running"
DEFAULT_LEASE_SECONDS = 60.0

log = logging.getLogger("promptfleet.pipeline")


@dataclass
class Claim:
    """A file this process took from the inbox, and the lease that says so."""

    path: Path  # where it was claimed to, in `.running/`
    holder: Holder

    def held(self) -> bool:
        """Whether this process may still act on the file: False once its lease lapsed or
        was taken over; a run then stops sending."""
        return self.holder.held()

    @property
    def lost(self) -> str | None:
        return self.holder.lost

    def moving_to(self, working_copy: Path) -> None:
        """The file is about to become its run's working copy; the lease follows it."""
        self.holder.subjects.append(working_copy)

    def _ours(self, what: str) -> bool:
        self.holder.stop()
        if self.holder.ours_on_disk():
            return True
        log.warning("%s: not %s, another process took over its claim (%s)", self.path.name, what, self.holder.lost or "its lease expired")
        return False

    def end(self) -> None:
        """The run is done with the file (finished, or given back): stop renewing."""
        self.holder.drop()


class Taken(Exception):
    """The work is someone else's, or done already: `reason` says which, in words."""

    def __init__(self, name: str, reason: str, running: bool = False):
        super().__init__(f"{name}: {reason}; nothing to do here")
        self.name, self.reason, self.running = name, reason, running


@dataclass
class Work:
    """An experiment this process now owns: the file to run (claimed out of the inbox when
    it was there) and, for an inbox file, its claim. The run lock is held in the session."""

    file: Path
    claim: Claim | None

    @property
    def move(self) -> bool:
        """A claimed file becomes its run's working copy; anything else is copied."""
        return self.claim is not None

    def settle(self, complete: bool, working_copy: Path | None, input_folder: Path) -> None:
        """The run ended: an unfinished inbox file goes back to the inbox to resume, wherever
        it got to; a finished one stays with its outputs."""
        if self.claim is None:
            return
        if complete:
            self.claim.end()
        elif self.claim.path.exists():
            release(self.claim)
        elif working_copy is not None and working_copy.exists():
            give_back_claimed(self.claim, working_copy, input_folder)
        else:  # a working copy not placed yet: the next poll's requeue_stranded finds it
            self.claim.end()

    def reject(self, report: str, data_folder: Path) -> Path | None:
        """A file that cannot run leaves the inbox for `rejected/`, as a poll does."""
        return reject(self.claim, report, data_folder) if self.claim is not None and self.claim.path.exists() else None


class Owner(Protocol):
    """What `take` needs of the caller's session: the claims and run locks it holds."""

    def claim_for(self, file: Path) -> Claim | None: ...
    def hold(self, claim: Claim) -> None: ...
    def let_go(self, claim: Claim) -> None: ...
    def lock_for(self, out_dir: Path) -> RunLock: ...


def take(file: Path, settings: Settings, session: Owner, wait: bool = False, on_wait=None) -> Work:
    """Claim the experiment in `file` for this process: the one claim of every entry point.

    A file in the inbox is claimed (renamed into `.running/`, with a lease), so the next
    poll does not run it again; the experiment's run lock is taken (or waited for). Taken
    again by the session that holds it, it is the same work. Raises `Taken` when another
    process has the file or the experiment, or the file was run already."""
    file = Path(file)
    claim = session.claim_for(file)
    if claim is None and file.parent.resolve() == settings.input_folder.resolve():
        claim = _claim_inbox_file(file, settings)
        session.hold(claim)
        file = claim.path
    try:
        session.lock_for(settings.output_folder / file.stem).acquire(wait, on_wait=on_wait)
    except RunBusy as busy:
        if claim is not None:
            session.let_go(claim)
            release(claim)
        raise Taken(file.stem, f"it is being run by {busy}", running=True) from None
    return Work(file, claim)


def _claim_inbox_file(file: Path, settings: Settings) -> Claim:
    if file.exists() and (claimed := claim(file, settings.lease_seconds)) is not None:
        claimed.holder.start()
        return claimed
    running = running_folder(file.parent) / file.name
    if lease := read_lease(_owner_file(running), settings.lease_seconds):
        raise Taken(file.name, f"it was claimed by pid {lease.pid} on {lease.host}, which runs it", running=True)
    if running.exists():
        raise Taken(file.name, "another process has just claimed it", running=True)
    if done := finished_run(settings.output_folder, file):
        raise Taken(file.name, f"it was run already ({done})")
    raise FileNotFoundError(f"{file}: file not found")


def finished_run(output_folder: Path, file: Path) -> Path | None:
    """The completed file of the newest finished run of an inbox file, if one ran."""
    running = running_folder(file.parent).resolve()
    found = []
    for state_file in (output_folder / file.stem).glob(f"*-run-{glob.escape(file.stem)}.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        source = Path(str(state.get("source", "")))
        if state.get("finished") and source.name == file.name and source.parent.resolve() == running:
            stamp = state_file.name.removesuffix(f"-run-{file.stem}.json")
            found.append((str(state.get("ended", "")), RunPaths(state_file.parent, stamp, file.stem).completed))
    return max(found)[1] if found else None


def running_folder(input_folder: Path) -> Path:
    return input_folder / RUNNING


def waiting_files(input_folder: Path, settle_seconds: float = 0.0) -> list[Path]:
    """Experiment files waiting in input/ and complete, oldest first.

    A file is complete when, for JSONL, it ends with a newline, and either it was moved in
    after its last write — its ctime, which every write sets to its mtime, is later: a
    rename, `mv`, `cp -p` — or nothing has written to it for `settle_seconds`. File times
    are coarse (a few ms): a file renamed in the same instant it was last written (a `.part`
    written and renamed at once) looks just written, and waits `settle_seconds`."""
    if not input_folder.is_dir():
        return []
    now = time.time()
    files = []
    for path in input_folder.iterdir():
        if path.name.startswith(".") or path.suffix not in EXTENSIONS or not path.is_file():
            continue
        stat = path.stat()
        moved_in = stat.st_ctime_ns > stat.st_mtime_ns
        if (not moved_in and now - stat.st_mtime < settle_seconds) or not _ends_complete(path, stat.st_size):
            continue
        files.append((stat.st_mtime, path.name, path))
    return [path for _, _, path in sorted(files)]


def _ends_complete(path: Path, size: int) -> bool:
    if path.suffix != ".jsonl" or size == 0:
        return size > 0
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def claim(path: Path, lease_seconds: float = DEFAULT_LEASE_SECONDS, clock: Clock | None = None) -> Claim | None:
    """Take a waiting file for this process, or None if someone else was faster. The
    caller starts renewing (`claim.holder.start()`) and ends the claim."""
    running = running_folder(path.parent)
    running.mkdir(exist_ok=True)
    target = running / path.name
    if target.exists():  # the same name is already running: leave this one waiting
        return None
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return Claim(target, Holder(_owner_file(target), target, lease_seconds, clock))


def release(claim: Claim) -> Path | None:
    """Put an unfinished file back in input/; re-running it resumes where it stopped.
    None when another process has taken the claim over (and put it back itself)."""
    if not claim._ours("put back"):
        return None
    back = claim.path.parent.parent / claim.path.name
    try:
        os.rename(claim.path, back)
    except FileNotFoundError:
        return None
    claim.end()
    return back


def give_back_claimed(claim: Claim, working_copy: Path, input_folder: Path) -> Path | None:
    """An unfinished run of a claimed file returns its working copy to the inbox, unless
    another process took the claim over meanwhile (then the file is its business)."""
    if not claim._ours("put back"):
        return None
    try:
        back = give_back(working_copy, input_folder, claim.path.name)
    except FileNotFoundError:
        return None
    claim.end()
    return back


def requeue_orphans(input_folder: Path, clock: Clock | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> list[Path]:
    """Put back claimed files whose lease expired (their owner, on any host, stopped
    renewing) or whose process died on this host. A claim with no owner record at all (a
    claimer killed between its rename and its record) is put back a lease after it was
    made. Files whose run already started are `requeue_stranded`'s."""
    running = running_folder(input_folder)
    if not running.is_dir():
        return []
    now = (clock or SystemClock()).now()
    requeued = []
    for claimed in sorted(running.iterdir()):
        if claimed.name.startswith(".") or claimed.suffix not in EXTENSIONS:
            continue
        owner = _owner_file(claimed)
        lease = read_lease(owner, lease_seconds)
        back = input_folder / claimed.name
        if lease is None:
            try:
                if now - claimed.stat().st_ctime > lease_seconds:
                    os.rename(claimed, back)
                    requeued.append(back)
            except FileNotFoundError:
                pass
            continue
        if not lease.stale(now) or not take_over(owner, lease):
            continue
        try:
            owner.unlink(missing_ok=True)  # first: a renewal now finds the claim gone
            os.rename(claimed, back)
            requeued.append(back)
        except FileNotFoundError:
            pass
        finally:
            done_taking_over(owner, lease)
    return requeued


def requeue_stranded(input_folder: Path, output_folder: Path, clock: Clock | None = None,
                     lease_seconds: float = DEFAULT_LEASE_SECONDS) -> list[Path]:  # fmt: skip
    """Put back inbox files whose run a dead process left unfinished (a worker killed with
    -9, a host that went down): the run's state names a claim in `.running/` and its
    working copy sits next to its outputs. Whether its process is gone is told by the
    claim's lease (expired, or its pid dead on this host) — across hosts, whatever the
    shared filesystem's flock is worth. A run held by a live flock is left alone even with
    an expired lease (same-host flocks are exact); without a lease (a run started by a
    version without leases) the flock alone decides, as it did then."""
    running = running_folder(input_folder).resolve()
    now = (clock or SystemClock()).now()
    requeued = []
    for state_file in output_folder.glob("*/*-run-*.json") if output_folder.is_dir() else []:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        source = Path(str(state.get("source", "")))
        if state.get("finished") or source.parent.resolve() != running:
            continue
        if (input_folder / source.name).exists() or (running / source.name).exists():
            continue  # waiting, or claimed again: its next run resumes this one
        stamp, _, name = state_file.name.removesuffix(".json").partition("-run-")
        working = RunPaths(state_file.parent, stamp, name, source.suffix).input
        owner = _owner_file(running / source.name)
        lease = read_lease(owner, lease_seconds)
        if lease is not None and (not lease.stale(now) or not take_over(owner, lease)):
            continue
        try:
            if back := _give_back_unlocked(working, input_folder, source.name, owner if lease else None):
                requeued.append(back)
        finally:
            if lease is not None:
                done_taking_over(owner, lease)
    return requeued


def _give_back_unlocked(working: Path, input_folder: Path, name: str, owner: Path | None) -> Path | None:
    lock = RunLock(working.parent)
    try:
        lock.acquire()
    except RunBusy:
        return None  # its run is alive
    except OSError:  # no flock on this share
        if owner is None:
            return None
    try:
        if owner is not None:
            owner.unlink(missing_ok=True)
        return give_back(working, input_folder, name) if working.exists() else None
    except FileNotFoundError:
        return None
    finally:
        lock.release()


def reject(claim: Claim, report: str, data_folder: Path) -> Path:
    """Move a file that cannot run to `rejected/`, with its error report next to it."""
    folder = data_folder / "rejected"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{now_stamp()}-{claim.path.name}"
    os.rename(claim.path, target)
    target.with_name(target.name + ".errors.txt").write_text(report + "\n")
    claim.end()
    return target


def place_working_copy(source: Path, target: Path, move: bool = False) -> None:
    """Put a run's input next to its outputs (prompto's `-input-` file) before sending: a
    copy written under a temporary name and renamed, or the file itself with -m."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if move:
        shutil.move(source, target)
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
