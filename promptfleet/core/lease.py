"""Leases: how a claim says "still mine" to every host sharing the data folder.

A lease is a small record — a random token, host, pid, when it was last renewed (wall
clock, since other hosts read it) and its time to live — kept in a file replaced whole by
rename, so a reader never sees half of one. Its holder renews it every TTL/4; any host may
take over a lease that has gone a whole TTL without renewal, and the holder itself stops
trusting a lease it has not renewed for TTL/2 (its own monotonic clock), so clocks may be
skewed by up to TTL/2 before two hosts could both believe they hold it.

Renewal runs in a thread, not the event loop: the CLI waits for a run lock and plans big
files synchronously, and a write to a hung network filesystem must not freeze sending.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from promptfleet.core import processes


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds, comparable across hosts (up to their skew)."""

    def monotonic(self) -> float:
        """Seconds that never go back, for this process's own deadlines."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    pid: int
    renewed_at: float
    ttl: float

    @classmethod
    def new(cls, ttl: float, clock: Clock) -> Lease:
        return cls(secrets.token_hex(8), socket.gethostname(), os.getpid(), clock.now(), ttl)

    def expired(self, now: float) -> bool:
        return now > self.renewed_at + self.ttl

    def dead_here(self) -> bool:
        """Its process is gone, and this host can tell (the fast path: no waiting a TTL)."""
        return self.host == socket.gethostname() and not processes.exists(self.pid)

    def stale(self, now: float) -> bool:
        return self.dead_here() or self.expired(now)


def write_lease(path: Path, lease: Lease) -> None:
    tmp = path.with_name(f"{path.name}.{lease.token}.tmp")
    tmp.write_text(json.dumps(asdict(lease)))
    os.replace(tmp, path)


def read_lease(path: Path, default_ttl: float) -> Lease | None:
    """The lease in `path`, None when there is no file. A record that is not a lease — torn
    by a disk, or written by a version without leases ({host, pid}) — counts as renewed
    when the file was last written, with `default_ttl`: it is taken over once that is old."""
    try:
        text = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = {}
    info = info if isinstance(info, dict) else {}
    try:
        return Lease(str(info["token"]), str(info["host"]), int(info["pid"]), float(info["renewed_at"]), float(info["ttl"]))
    except (ValueError, TypeError, KeyError):
        pid = info.get("pid")
        return Lease(f"unleased-{mtime}", str(info.get("host", "?")), pid if isinstance(pid, int) else -1, mtime, default_ttl)


def take_over(path: Path, seen: Lease) -> bool:
    """Become the one poll that puts back what `seen` held. Exclusive per lease token (an
    O_EXCL marker), and re-read after, so two polls racing — or a poll that judged a lease
    just before it was renewed or replaced — never both act. The caller removes `path` and
    then calls `done_taking_over`."""
    marker = _marker(path, seen)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - marker.stat().st_mtime < seen.ttl:
                return False
        except FileNotFoundError:
            return False  # the other poll just finished: the re-read below would refuse anyway
        marker.unlink(missing_ok=True)  # left by a poll that died mid-way: a TTL is long enough
        return take_over(path, seen)
    current = read_lease(path, seen.ttl)
    if current is None or current.token != seen.token or current.renewed_at != seen.renewed_at:
        marker.unlink(missing_ok=True)
        return False
    return True


def done_taking_over(path: Path, seen: Lease) -> None:
    _marker(path, seen).unlink(missing_ok=True)


def _marker(path: Path, seen: Lease) -> Path:
    return path.with_name(f"{path.name}.{seen.token}.takeover")


class Holder:
    """This process's side of one lease: renews it, and says whether it may still act on it.

    `subjects` are where the file the lease is about may be (claimed, then its working
    copy); a renewal that finds it in neither place, or the record
    holding another token, knows the lease was taken over, and it is never renewed again.
    A lease not renewed for TTL/2 by this process's clock is not trusted either: a process
    paused for that long stops sending before anyone else may start."""

    def __init__(self, path: Path, subject: Path, ttl: float, clock: Clock | None = None):
        self.path, self.subjects, self.clock = path, [subject], clock or SystemClock()
        self.lease = Lease.new(ttl, self.clock)
        self._valid_until = self.clock.monotonic() + ttl / 2
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        write_lease(path, self.lease)

    def held(self) -> bool:
        if self.lost is None and self.clock.monotonic() > self._valid_until:
            self.lost = f"its lease was not renewed for {self.lease.ttl / 2:g}s"
        return self.lost is None

    def ours_on_disk(self) -> bool:
        current = read_lease(self.path, self.lease.ttl)
        return current is not None and current.token == self.lease.token

    def renew(self) -> bool:
        started = self.clock.monotonic()
        if not self.held():
            return False
        if not self.ours_on_disk():
            self.lost = "another process took it over after its lease expired"
        elif not any(subject.exists() for subject in self.subjects):
            self.lost = f"{self.subjects[0].name} was moved away by another process"
        if self.lost:
            return False
        self.lease = replace(self.lease, renewed_at=self.clock.now())
        try:
            write_lease(self.path, self.lease)
        except OSError:  # an unwritable share: keep trying until the lease lapses
            return self.held()
        self._valid_until = started + self.lease.ttl / 2
        return True

    def start(self) -> None:
        """Renew every TTL/4 in a daemon thread until `stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._keep, name=f"lease {self.subjects[0].name}", daemon=True)
            self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.lease.ttl / 4):
            if not self.renew():
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def drop(self) -> None:
        """Stop renewing and remove the record if it is still ours."""
        self.stop()
        if self.ours_on_disk():
            self.path.unlink(missing_ok=True)


def acquire(path: Path, ttl: float, clock: Clock | None = None) -> Holder | Lease:
    """A lease record created at `path` for this process (a Holder, not yet renewing), or
    the live lease of whoever holds it. Created with O_EXCL; a stale record (its holder
    dead here, or a TTL without renewal) is taken over by exactly one caller."""
    clock = clock or SystemClock()
    for _ in range(3):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            seen = read_lease(path, ttl)
            if seen is None:
                continue  # removed meanwhile: try again
            if not seen.stale(clock.now()) or not take_over(path, seen):
                return seen
            try:
                path.unlink(missing_ok=True)
            finally:
                done_taking_over(path, seen)
            continue
        return Holder(path, path, ttl, clock)
    return read_lease(path, ttl) or Lease("?", "?", -1, clock.now(), ttl)
