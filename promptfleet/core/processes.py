"""Whether a process of this host still exists, for owner records that name a pid."""

from __future__ import annotations

import os


def exists(pid: int) -> bool:
    """True for a live process, also one of another user (signalling it is refused)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
