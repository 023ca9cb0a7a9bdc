"""A warm interpreter beside the background server, so a command does not import Prefect.

Importing Prefect and the provider SDKs costs a fresh process 1.5-3 s of CPU before its
first request, the same on every run. The warm runner pays it once: it imports them, then
waits on a Unix socket in PREFECT_HOME. A `promptfleet` command (`launch.py`) hands it its
argv, working folder, environment and standard streams; the runner forks a child that
becomes that command exactly (same streams, folder, environment, Prefect settings re-read)
and imports promptfleet itself fresh, so our own code is never stale and nothing of ours
was decided with the runner's environment.

Fork needs a process with one thread and no running event loop: the runner preloads only
libraries that start no thread at import (polars does, so it is loaded by the run as
before) and checks the count before serving. A runner whose preloaded code changed on disk
(an upgrade, an edited checkout) refuses and exits; the command then runs in its own
process, as it does when no runner is there, and starts a new runner for the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from typing import Any
from pathlib import Path

SOCKET_FILE = "promptfleet-warm.sock"
PID_FILE = "promptfleet-warm.pid"
LOCK_FILE = "promptfleet-warm.lock"
LOG_FILE = "promptfleet-warm.log"
OFF_ENV = "PROMPTFLEET_WARM"
# imported once by the runner; promptfleet itself is not (see the module docstring)
# (and what a run or an SDK client imports later on its own, measured: none reads the
# environment at import, which is why typer and rich are not here)
PRELOAD = (
    "prefect.main", "prefect.flow_engine", "prefect.task_engine", "prefect.artifacts", "prefect.events",
    "prefect.runtime", "prefect.states", "prefect.client.orchestration", "prefect.utilities.urls",
    "prefect.utilities.visualization", "prefect.blocks.system", "openai", "anthropic", "google.genai",
    "httpcore2", "h2.connection", "truststore", "anyio._backends._asyncio", "pydantic.v1", "aiolimiter",
    "encodings.idna",
)  # fmt: skip
CHECK_S = 5.0  # how often an idle runner checks that its server still runs
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST = 16 << 20
# variables the runner keeps from its starter: what Python and Prefect need to import, no secrets
RUNNER_ENV = ("PATH", "HOME", "USER", "LANG", "LANGUAGE", "TMPDIR", "VIRTUAL_ENV", "PREFECT_HOME")


def enabled() -> bool:
    return os.environ.get(OFF_ENV, "").strip().lower() not in ("0", "false", "no", "off")


def home_of_env() -> Path:
    """PREFECT_HOME as a command finds it before importing Prefect; a home set only in a
    Prefect profile is not seen, and such a command simply runs in its own process."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


# --- the wire: one length-prefixed JSON request with the three streams, JSON lines back ---


def send_request(sock: socket.socket, request: dict, fds: list[int]) -> None:
    body = json.dumps(request).encode()
    data = struct.pack("!I", len(body)) + body
    sent = socket.send_fds(sock, [data], fds)
    sock.sendall(data[sent:])


def _receive_request(sock: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 3)
    try:
        if len(data) < 4:
            raise ValueError("short request")
        (size,) = struct.unpack("!I", data[:4])
        if size > MAX_REQUEST:
            raise ValueError("request too large")
        body = bytearray(data[4:])
        while len(body) < size:
            chunk = sock.recv(min(1 << 20, size - len(body)))
            if not chunk:
                raise ValueError("request cut short")
            body += chunk
        return json.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def send_line(sock: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(json.dumps(message).encode() + b"\n")


def lines(sock: socket.socket) -> Iterator[dict]:
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


# --- what makes a command's interpreter and the runner's the same ------------------------


def interpreter() -> dict:
    return {
        "executable": os.path.realpath(sys.executable),
        "version": sys.version,
        "flags": list(sys.flags),
        "warnoptions": sys.warnoptions,
        "xoptions": {k: str(v) for k, v in sys._xoptions.items()},
    }


def _origin(name: str, path: list[str]) -> str | None:
    """The folder of `path` a plain import of `name` would load it from."""
    relative = name.replace(".", os.sep)
    for entry in path:
        base = os.path.join(entry or ".", relative)
        if os.path.isdir(base) or os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py")):
            return os.path.realpath(entry or ".")
    return None


def _code_stamp(loaded: list[str]) -> list:
    """What changes when the code the runner holds changes on disk: the installed
    distributions, promptfleet's own files, and every preloaded package's entry file."""
    import promptfleet

    stamp: list = []
    for entry in sorted({p for p in sys.path if p and os.path.isdir(p)}):
        with contextlib.suppress(OSError):
            stamp.append(sorted(n for n in os.listdir(entry) if n.endswith((".dist-info", ".egg-info", ".pth"))))
    ours = Path(promptfleet.__file__).parent
    for path in sorted(ours.rglob("*.py")):
        with contextlib.suppress(OSError):
            stat = path.stat()
            stamp.append([str(path), stat.st_mtime_ns, stat.st_size])
    for name in loaded:
        if (module := sys.modules.get(name)) is not None and getattr(module, "__file__", None):
            with contextlib.suppress(OSError):
                stamp.append([module.__file__, os.stat(module.__file__).st_mtime_ns])
    return stamp


# --- the runner --------------------------------------------------------------------------


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _preload() -> list[str]:
    import importlib

    loaded = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception:  # noqa: BLE001 - an optional SDK not installed: its provider imports it when used
            continue
    return loaded


class Runner:
    def __init__(self, home: Path):
        self.home = home
        self.path = home / SOCKET_FILE
        self.children: dict[int, socket.socket] = {}
        self.stopping = False
        self.own_fds: list[int] = []  # closed in every child: they are the runner's, not the command's
        self.loaded: list[str] = []
        self.stamp: list = []
        self.poll: Any = None

    def compatible(self, request: dict) -> str | None:
        """Why this command's interpreter differs from ours, or None when it does not."""
        if request.get("interpreter") != interpreter():
            return "another Python interpreter or other interpreter options"
        theirs = [os.path.join(request["cwd"], p) if p and not os.path.isabs(p) else p for p in request.get("path", [])]
        for name in self.loaded:
            if _origin(name, theirs) != _origin(name, sys.path):
                return f"{name} would be imported from elsewhere"
        if _code_stamp(self.loaded) != self.stamp:
            self.stopping = True  # never serve again: the next command starts a fresh runner
            return "installed code changed since the runner started"
        return None

    def serve(self) -> int:
        import fcntl
        import gc

        self.home.mkdir(parents=True, exist_ok=True)
        lock = (self.home / LOCK_FILE).open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # another runner of this home is starting or serving
        self.loaded = _preload()
        if (threads := _threads()) != 1:
            print(f"not serving: {threads} threads after preloading (fork needs one)", file=sys.stderr)
            return 1
        self.stamp = _code_stamp(self.loaded)
        gc.collect()
        gc.freeze()  # the children's copy-on-write pages stay shared
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(64)
        self.own_fds = [lock.fileno(), listener.fileno()]
        inode = self.path.stat().st_ino
        (self.home / PID_FILE).write_text(f"{os.getpid()}\n")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # poll, not selectors: a command's connection is watched for its script hanging up
        # (POLLRDHUP) without reading from it, since the child reads from the same socket
        self.poll = select.poll()
        self.poll.register(listener, select.POLLIN)
        self.poll.register(wake_r, select.POLLIN)
        self.own_fds += [wake_r, wake_w]
        print(f"serving on {self.path} (pid {os.getpid()}), preloaded {', '.join(self.loaded)}", file=sys.stderr, flush=True)
        try:
            while not (self.stopping and not self.children):
                for fd, _event in self.poll.poll(CHECK_S * 1000):
                    if fd == wake_r:
                        with contextlib.suppress(OSError):
                            os.read(wake_r, 4096)
                    elif fd == listener.fileno():
                        if not self.stopping:
                            self._accept(listener)
                    else:
                        self._hung_up(fd)
                self._reap()
                if not self.stopping and not self._still_wanted(inode):
                    self.stopping = True
                if self.stopping and listener.fileno() >= 0:
                    self.poll.unregister(listener)
                    listener.close()
                    self._unlink(inode)
        finally:
            self._unlink(inode)
        return 0

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def _unlink(self, inode: int) -> None:
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == inode:
                self.path.unlink()
        with contextlib.suppress(OSError, ValueError):
            if int((self.home / PID_FILE).read_text()) == os.getpid():
                (self.home / PID_FILE).unlink()

    def _still_wanted(self, inode: int) -> bool:
        """A runner serves while its background server runs and its socket is its own."""
        from promptfleet import server

        try:
            return self.path.stat().st_ino == inode and server.status(self.home) is not None
        except OSError:
            return False

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                raise PermissionError("another user")
            conn.settimeout(REQUEST_TIMEOUT_S)
            request, fds = _receive_request(conn)
            if len(fds) != 3:
                raise ValueError("three streams expected")
            if why := self.compatible(request):
                send_line(conn, {"refused": why})
                raise ValueError(why)
            pid = os.fork()
        except Exception:  # noqa: BLE001 - a bad or refused client never stops the runner
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        if pid == 0:
            for fd in self.own_fds + [other.fileno() for other in self.children.values()]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            _child(conn, request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.poll.register(conn, select.POLLRDHUP)
        send_line(conn, {"pid": pid})

    def _hung_up(self, fd: int) -> None:
        """The script of a running command is gone (kill -9, a closed terminal): its run goes
        too, even when it is stopped (Ctrl-Z) and cannot notice by itself."""
        self.poll.unregister(fd)
        for pid, conn in self.children.items():
            if conn.fileno() == fd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if (conn := self.children.pop(pid, None)) is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.poll.unregister(conn)
                send_line(conn, {"exit": code if code >= 0 else 128 - code})
                conn.close()


def _stdio(encodings: dict) -> None:
    """Streams as Python would have made them for this command: its encodings, line
    buffered on a terminal, stderr always line buffered, none buffered with PYTHONUNBUFFERED."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, mode: str, name: str, line: bool) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        if mode == "r":
            binary: io.RawIOBase | io.BufferedIOBase = io.BufferedReader(raw)
        else:
            binary = raw if unbuffered else io.BufferedWriter(raw)
        enc = encodings.get(name) or ["utf-8", "strict"]
        return io.TextIOWrapper(binary, encoding=enc[0], errors=enc[1], line_buffering=line, write_through=unbuffered and mode == "w")

    sys.stdin = sys.__stdin__ = stream(0, "r", "stdin", False)
    sys.stdout = sys.__stdout__ = stream(1, "w", "stdout", os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", "stderr", True)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Become the command: its streams, folder, environment and settings, then its main.
    Never returns; exits the way a fresh interpreter would (threads joined, atexit run)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(int(request.get("umask", 0o022)))
        os.environ.clear()
        os.environ.update(request["env"])
        with contextlib.suppress(Exception):  # as Python's start-up does, from this environment
            import locale

            locale.setlocale(locale.LC_CTYPE, "")
        sys.argv = list(request["argv"])
        sys.modules["__main__"] = _script_main(sys.argv[0])
        sys.path[:] = list(request["path"])
        _stdio(request.get("encodings", {}))
        conn.settimeout(None)
        if conn.recv(1) != b"g":  # the command gave up waiting for us: it runs itself
            os._exit(0)
        _die_with_the_command(conn)
        import prefect.context
        import prefect.logging.configuration

        prefect.context.refresh_global_settings_context()
        prefect.logging.configuration.setup_logging(incremental=False)
        from promptfleet.cli import main

        main()
        code = 0
    except SystemExit as done:
        code = _exit_code(done.code)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, exit 1
        import traceback

        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        _shutdown()
        os._exit(code)


def _script_main(path: str) -> object:
    """`__main__` as the `promptfleet` script has it (Click names the program from it),
    not the runner's `python -m promptfleet.warm`."""
    import types

    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__package__ = None
    main.__spec__ = None
    return main


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    with contextlib.suppress(Exception):
        print(value, file=sys.stderr)
    return 1


def _die_with_the_command(conn: socket.socket) -> None:
    """The command process gone (kill -9, a closed terminal) means this process goes too,
    as it would had it been that process: nothing sent after the command died."""
    import threading

    def watch() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1):
                pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="promptfleet-warm-watch", daemon=True).start()


def _shutdown() -> None:
    import atexit
    import threading

    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as at exit
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


# --- started and stopped with the background server --------------------------------------


def pid_of(home: Path) -> int | None:
    """The live runner of `home`, checked by its command line (a reused PID is not it)."""
    try:
        pid = int((home / PID_FILE).read_text())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"promptfleet.warm" in args else None


def start(home: Path) -> None:
    """Start a runner for `home` in the background unless one serves or it is switched off.
    It imports for a few seconds on its own; the command that starts it does not wait."""
    import subprocess

    if not enabled() or sys.platform != "linux" or pid_of(home) is not None:
        return
    env = {k: v for k, v in os.environ.items() if k in RUNNER_ENV or k.startswith(("LC_", "PYTHON"))}
    env["PREFECT_HOME"] = str(home)
    with contextlib.suppress(OSError), (home / LOG_FILE).open("ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "promptfleet.warm", str(home)], env=env, cwd=home,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )  # fmt: skip


def stop(home: Path, wait: float = 3.0) -> int | None:
    """Ask the runner of `home` to stop and wait a little for it; commands it is running
    finish first (it stays until they end, to hand each its exit code)."""
    import time

    if (pid := pid_of(home)) is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and pid_of(home) == pid:
        time.sleep(0.05)
    return pid


if __name__ == "__main__":
    sys.exit(Runner(Path(sys.argv[1])).serve())
