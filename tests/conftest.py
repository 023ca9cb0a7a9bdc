"""Hermetic test setup: a temporary PREFECT_HOME, no PREFECT_API_URL, telemetry off,
one Prefect server for the whole run (shared by the test processes), no background server
left running, and no real provider credentials."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="promptfleet-test-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
# A command that finds no server uses a temporary one that dies with it, never the
# persistent background server (tests of that give it a PREFECT_HOME of its own).
os.environ["PROMPTFLEET_EPHEMERAL"] = "1"
for _name in list(os.environ):
    if _name.startswith(("OPENAI_", "AZURE_OPENAI_", "ANTHROPIC_", "GEMINI_", "OLLAMA_", "HUGGINGFACE_")):
        del os.environ[_name]

import pytest  # noqa: E402

from tests.fakes import FakeServer  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """One Prefect server for the whole test run; yields its API URL. Exported in the
    environment too, so every command a test starts, in this process or as a subprocess,
    reports to it instead of starting a temporary server of its own (10-15 s each): modules
    that run commands ask for it (`pytestmark`). Tests of the background and temporary
    servers remove it from their commands' environment.

    The test processes (pytest-xdist workers) share it: starting one costs ~15 s of CPU,
    and each test process holds it until its own end; the last to let go stops it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    worker = getattr(request.config, "workerinput", None)
    folder = tmp_path_factory.getbasetemp() if worker is None else tmp_path_factory.getbasetemp().parent  # the run's, not this process's
    url = _shared_server(folder, +1)
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _shared_server(folder, -1)


def _shared_server(folder: Path, change: int) -> str:
    """Count one more (or one fewer) test process using the run's Prefect server, starting it
    for the first and stopping it after the last; its API URL."""
    import fcntl

    state = folder / "prefect-server.json"
    with (folder / "prefect-server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process at a time starts, counts or stops
        server = json.loads(state.read_text()) if state.exists() else _start_server(folder / "prefect-server")
        server["users"] += change
        if server["users"] > 0:
            state.write_text(json.dumps(server))
        else:
            state.unlink(missing_ok=True)
            _stop_group(server["pid"])
        return server["api"]


def _start_server(home: Path) -> dict[str, Any]:
    """`prefect server start` in a session of its own, without what the tests never use."""
    import subprocess
    import time

    import httpx

    from tests.test_server_mode import PREFECT, free_port

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    home.mkdir()
    with (home / "server.log").open("wb") as log:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--no-scheduler",
                                 "--no-late-runs"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return {"pid": proc.pid, "api": api, "users": 0}
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
        time.sleep(0.2)


def _stop_group(pid: int) -> None:
    """SIGTERM the server's session (it and what it started), SIGKILL if it outlives 30 s."""
    import signal
    import time

    from promptfleet.core import processes

    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while processes.exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if processes.exists(pid):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def fake_openai() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


@pytest.fixture
def openai_env(fake_openai: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-0123456789")
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    return fake_openai


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The OpenAI, Anthropic and Gemini batch APIs at one local fake, the SDKs pointed at it."""
    from tests.fake_batches import FakeBatchServer

    with FakeBatchServer() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        server.state.polls_to_finish = 1
        yield server


def stop_process(proc: Any, timeout: float = 30) -> None:
    """SIGTERM a process this test started, then SIGKILL it if it does not end in time."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """Commands load .env files into os.environ; no test may leak that into the next."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# The modules that hold a test process longest (their own servers, workers and waits for a
# crash to be noticed), longest first. pytest-xdist starts them before the rest, which fill
# the other processes around them (by default it would start modules with most tests first,
# and these last: the run would end waiting for them).
LONGEST_FIRST = ("test_scale_out.py", "test_server_mode.py", "test_server.py", "test_signals.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each module, and of the other modules, is kept
