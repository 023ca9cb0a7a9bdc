"""A local Prefect server that outlives one command, so runs start in seconds and stay in
the UI: started on 127.0.0.1 by the first `run`/`pipeline`, found again by the next ones
through a small state file in PREFECT_HOME, stopped by `promptfleet server stop`.

Prefect's own `prefect server start --background` keeps only a PID (no port), refuses to
start after a crash left its PID file behind, and leaves the server in the caller's
process group (a Ctrl-C in that terminal would stop it) writing into pipes nobody reads.
So we start `prefect server start` ourselves, in a session of its own with its output in a
log file, and also write Prefect's `server.pid` so that `prefect server stop` works too.

A temporary server (`--ephemeral`) is tied to the process that started it: it is stopped
when that process ends, and on Linux the kernel stops it even after a kill -9.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from promptfleet.core import processes

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
STATE_FILE = "promptfleet-server.json"
PREFECT_PID_FILE = "server.pid"  # Prefect's name: `prefect server stop` finds our server too
LOG_FILE = "promptfleet-server.log"
LOCK_FILE = "promptfleet-server.lock"
EPHEMERAL_ENV = "PROMPTFLEET_EPHEMERAL"
CA_FILE = "promptfleet-loopback-ca.pem"
START_TIMEOUT = 120.0
DRAIN_TIMEOUT = 10.0  # seconds a temporary server waits for the logs and events still on their way


class ServerError(RuntimeError):
    """The server could not be started or reached; the message is one line for people."""


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    port: int
    started: str

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"


def ephemeral_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(EPHEMERAL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configured_api_url() -> str | None:
    """The API URL the user set (environment, Prefect profile, .env/prefect.toml); it always wins."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def plain_http_env(home: Path) -> dict[str, str]:
    """Environment for the Prefect clients of a server we started on http://127.0.0.1.

    Every Prefect client builds a TLS context from a CA bundle, plain HTTP or not: six per
    run, ~25 ms of CPU each with certifi's ~140 certificates. Pointed at a bundle of one
    certificate they cost nothing, and no certificate is ever checked: no TLS is spoken
    with a plain-HTTP loopback server. A bundle the user named is kept."""
    if os.environ.get("PREFECT_API_SSL_CERT_FILE"):
        return {}
    path = home / CA_FILE
    if not path.exists():
        import certifi

        begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
        bundle = Path(certifi.where()).read_text()
        first = bundle[bundle.index(begin) : bundle.index(end) + len(end)]
        tmp = home / f".{CA_FILE}.{os.getpid()}"
        try:
            tmp.write_text(first + "\n")
            os.replace(tmp, path)
        except OSError:  # a full or read-only PREFECT_HOME: the saving is not worth a failed run
            tmp.unlink(missing_ok=True)
            return {}
    return {"PREFECT_API_SSL_CERT_FILE": str(path)}


def ui_url_of(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def flow_run_url(api_url: str, flow_run_id: object) -> str:
    return f"{ui_url_of(api_url)}/runs/flow-run/{flow_run_id}"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether the API answers. Plain urllib, no proxies: an httpx client would load a TLS
    context (~0.1 s) for every check of a plain-HTTP loopback address."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    """Whether `pid` is a live Prefect server process (a PID reused after a reboot is not)."""
    if not processes.exists(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        if not any(b"prefect" in a for a in args):
            return False
        with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped) is not alive
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


def _read(home: Path) -> ServerInfo | None:
    try:
        data = json.loads((home / STATE_FILE).read_text())
        return ServerInfo(int(data["pid"]), int(data["port"]), str(data.get("started", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _forget(home: Path, info: ServerInfo | None) -> None:
    (home / STATE_FILE).unlink(missing_ok=True)
    pid_file = home / PREFECT_PID_FILE
    with contextlib.suppress(OSError, ValueError):
        if info is None or int(pid_file.read_text().strip()) == info.pid:
            pid_file.unlink()


def _prefect_pid_file_in_use(home: Path) -> bool:
    try:
        return _alive(int((home / PREFECT_PID_FILE).read_text().strip()))
    except (OSError, ValueError):
        return False


def status(home: Path) -> ServerInfo | None:
    """The running background server of this PREFECT_HOME; a state file left by a server
    that died (kill -9, reboot) is recognised and removed."""
    info = _read(home)
    if info is None:
        if (home / STATE_FILE).exists():
            _forget(home, None)
        return None
    if not _alive(info.pid):
        _forget(home, info)
        return None
    return info


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def preferred_port() -> int:
    """Prefect's own setting for its server's port (PREFECT_SERVER_API_PORT, 4200 by default)."""
    from prefect.settings import get_current_settings

    return get_current_settings().server.api.port or DEFAULT_PORT


def pick_port(preferred: int | None = None) -> int:
    preferred = preferred or preferred_port()
    return preferred if _port_free(preferred) else free_port()


def _server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


# What a Prefect server process needs from the launching shell, and nothing else: it lives
# for days, and the shell (with the .env file loaded into it) holds provider keys, tokens,
# and URLs with passwords that the server has no use for.
_PROCESS_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONNOUSERSITE", "PYTHONUTF8", "PYTHONIOENCODING",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "DO_NOT_TRACK",
)  # fmt: skip
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
# The server's own settings: its database (which may need a password) and its API's auth.
_SERVER_OWN = ("PREFECT_SERVER_", "PREFECT_API_DATABASE_")


def _served_on(port: int) -> dict[str, str]:
    """Prefect's UI asks its API at `PREFECT_UI_API_URL`, which defaults to port 4200 whatever
    `--port` says (`GET /ui-settings`): the UI of a server on another port would show another
    server's runs, or none. Set for every server promptfleet starts."""
    return {"PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(port), "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api"}


def _server_env(home: Path) -> dict[str, str]:
    """An allowlist: the process basics, and Prefect's settings less the clients'
    credentials (PREFECT_API_KEY, auth strings, URLs with a user or password) — except the
    server's own database and auth settings, which it needs to run."""
    env = {}
    for name, value in os.environ.items():
        if name in _PROCESS_ENV or name.startswith("LC_"):
            env[name] = value
        elif name.startswith(_SERVER_OWN) or (
            name.startswith("PREFECT_") and not any(word in name for word in _SECRET_WORDS) and not _has_credentials(value)
        ):
            env[name] = value
    env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline by design
    return env


def _has_credentials(value: str) -> bool:
    """Whether a value holds a URL with a user or password (scheme://user:pass@host)."""
    from urllib.parse import urlsplit

    for word in value.split():
        if "://" in word and "@" in word:
            try:
                parts = urlsplit(word)
            except ValueError:
                return True
            if parts.username or parts.password:
                return True
    return False


def _wait_healthy(proc: subprocess.Popen, info: ServerInfo, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(info.api_url, timeout=1.0):
            return
        if proc.poll() is not None:
            raise ServerError(f"the Prefect server exited during start-up (code {proc.returncode}): {_last_line(log)} (full log: {log})")
        time.sleep(0.25)
    _terminate(proc.pid)
    raise ServerError(f"the Prefect server did not answer within {timeout:.0f} s (log: {log})")


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["no output"])[-1][:300]
    return "no output"


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One starter at a time per PREFECT_HOME: two first commands at once share one server."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with (home / LOCK_FILE).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start(home: Path, port: int | None = None, announce: Callable[[str], None] | None = None, timeout: float = START_TIMEOUT) -> tuple[ServerInfo, bool]:
    """The background server of `home`, started if none runs; returns it and whether it was
    started now. It runs in a session of its own, so it outlives this process on purpose."""
    with _locked(home):
        if (running := status(home)) is not None:
            if not healthy(running.api_url):  # still starting (another command started it), or hung
                deadline = time.monotonic() + timeout
                while not healthy(running.api_url):
                    if time.monotonic() > deadline or not _alive(running.pid):
                        raise ServerError(
                            f"the Prefect server at {running.ui_url} (pid {running.pid}) does not answer; "
                            "stop it with `promptfleet server stop` and try again"
                        )
                    time.sleep(0.25)
            return running, False
        chosen = port or pick_port()
        if port and not _port_free(port):
            raise ServerError(f"port {port} on {HOST} is taken; choose another with --port")
        log = home / LOG_FILE
        if announce:
            announce(
                f"starting Prefect server at http://{HOST}:{chosen} (first time ~15 s) — stop with `promptfleet server stop`"
            )
        with log.open("ab") as out:
            proc = subprocess.Popen(
                _server_command(chosen), env={**_server_env(home), **_served_on(chosen)}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        info = ServerInfo(proc.pid, chosen, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (home / STATE_FILE).write_text(json.dumps(asdict(info)) + "\n")
        if not _prefect_pid_file_in_use(home):  # one started with `prefect server start --background` keeps its own
            (home / PREFECT_PID_FILE).write_text(str(proc.pid))
        try:
            _wait_healthy(proc, info, log, timeout)
        except ServerError:
            _forget(home, info)
            raise
        return info, True


def _terminate(pid: int, grace: float = 20.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        _reap(pid)
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop(home: Path) -> ServerInfo | None:
    """Stop the background server of `home`; None when none was running."""
    with _locked(home):
        info = status(home)
        if info is None:
            return None
        _terminate(info.pid)
        _forget(home, info)
        return info


@contextlib.contextmanager
def use_api(url: str, extra_env: dict[str, str] | None = None) -> Iterator[None]:
    """Point Prefect at `url` for the rest of this process (its threads included), then back."""
    import prefect.context

    changes = {"PREFECT_API_URL": url, **(extra_env or {})}
    saved_env, saved_context = {name: os.environ.get(name) for name in changes}, prefect.context.GLOBAL_SETTINGS_CONTEXT
    os.environ.update(changes)
    prefect.context.refresh_global_settings_context()
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        prefect.context.GLOBAL_SETTINGS_CONTEXT = saved_context  # as it was, without re-reading every source


def console_handlers() -> list[logging.Handler]:
    """The handlers through which Prefect prints to the terminal, its logging set up now
    if it was not yet (the first flow import would do it, replacing nothing later)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    return [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.StreamHandler)]


# --- a temporary server, tied to this process -------------------------------------------


@contextlib.contextmanager
def temporary(home: Path, timeout: float = START_TIMEOUT) -> Iterator[ServerInfo]:
    """A one-shot server on a free port for the length of the block, never left behind."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "promptfleet-temporary-server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            _server_command(port), env={**_server_env(home), **_served_on(port)}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=processes.parent_death_signal(),
        )  # fmt: skip
    info = ServerInfo(proc.pid, port, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        _wait_healthy(proc, info, log, timeout)
        yield info
    finally:
        _deliver_pending(DRAIN_TIMEOUT)
        _terminate(proc.pid)
        proc.wait()


def _deliver_pending(timeout: float) -> None:
    """Send the logs and events Prefect still holds to the server before it stops, as
    Prefect's own test harness does: left for interpreter exit they would meet a stopped
    server ("Error logging to API", retried for minutes). Bounded: a hung server cannot
    hold the command."""
    if "prefect.logging.handlers" not in sys.modules:  # nothing was logged to the API
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)
