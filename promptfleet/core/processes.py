"""Processes of this host: whether one named by an owner record still exists, its
children, and a child that dies with its parent."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


def parent_death_signal() -> Callable[[], None] | None:
    """A function for a child to run before exec, asking the kernel for SIGTERM when its
    parent dies (Linux's PR_SET_PDEATHSIG): a helper process we start is never left
    behind by a `kill -9` of its command. Resolved here, not in the forked child."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


def exists(pid: int) -> bool:
    """True for a live process, also one of another user (signalling it is refused). A
    zombie is not one: it has died, and holds nothing, but stays listed until its parent
    reaps it — which takes as long as its parent's parent likes when its parent died too
    (a worker killed with everything it started)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): as signalling said
        return False
    return state in ("Z", "X")


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux: read from /proc; elsewhere none)."""
    found = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found
