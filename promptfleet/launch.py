"""The `promptfleet` command: handed to the warm runner when one serves, else run here.

This module imports only the standard library, so handing over costs a few milliseconds.
The command process stays for the command's whole life: it forwards the signals it gets
(Ctrl-C, SIGTERM, a closed terminal, Ctrl-Z) to the process running the command, returns
its exit code, and its death ends that process too (see `warm._die_with_the_command`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from promptfleet import warm

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
COLD_COMMANDS = ("server",)  # they manage the runner itself
CONNECT_TIMEOUT_S = 2.0


def _encodings() -> dict[str, list[str]]:
    out = {}
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and getattr(stream, "encoding", None):
            out[name] = [stream.encoding, stream.errors or "strict"]
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _forward(pid: int) -> None:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def suspend(_signum: int, _frame: object) -> None:  # Ctrl-Z stops both; fg resumes both
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)

    def resume(_signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTSTP, suspend)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGTSTP, suspend)
    signal.signal(signal.SIGCONT, resume)


def _hand_over(sock: socket.socket) -> tuple[int, object] | None:
    """Send this command to the runner; its process id once it is about to run it."""
    try:
        request = {
            "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path, "umask": _umask(),
            "encodings": _encodings(), "interpreter": warm.interpreter(),
        }  # fmt: skip
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(str(warm.home_of_env() / warm.SOCKET_FILE))
        warm.send_request(sock, request, [0, 1, 2])
        replies = warm.lines(sock)
        first = next(replies, None)
        if not first or "pid" not in first:
            return None  # refused: another interpreter, or code changed since the runner started
        sock.settimeout(None)
        sock.sendall(b"g")
        return int(first["pid"]), replies
    except (OSError, ValueError):
        return None


def run_warm() -> int | None:
    """The command's exit code when the warm runner ran it; None when it should run here
    (no runner, a runner of another interpreter or stale code, a stream that is closed)."""
    if not (warm.home_of_env() / warm.SOCKET_FILE).exists():
        return None
    blocked = set(FORWARDED) | {signal.SIGTSTP}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # a Ctrl-C now is delivered once the process is known
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        if (handed := _hand_over(sock)) is None:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            return None
        # from here the command runs there: whatever happens, it must not also run here
        pid, replies = handed
        _forward(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        with contextlib.suppress(OSError, ValueError):
            for message in replies:
                if "exit" in message:
                    return int(message["exit"])
    print("promptfleet: lost the warm runner before the command ended", file=sys.stderr)
    return 1


def main() -> None:
    if warm.enabled() and sys.platform == "linux" and len(sys.argv) > 1 and sys.argv[1] not in COLD_COMMANDS:
        if (code := run_warm()) is not None:
            sys.exit(code)
    from promptfleet.cli import main as cold

    cold()


if __name__ == "__main__":
    main()
