"""Hermetic test setup: a temporary PREFECT_HOME, no PREFECT_API_URL, telemetry off,
one Prefect test server for the whole session, no background server left running, and
no real provider credentials."""

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
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server for the whole session; yields its API URL. Exported in the
    environment too, so every command a test starts, in this process or as a subprocess,
    reports to it instead of starting a temporary server of its own (10-15 s each): modules
    that run commands ask for it (`pytestmark`). Tests of the background and temporary
    servers remove it from their commands' environment."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


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


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A Prefect server of its own, for a test that needs a fresh one."""
    from tests.test_server_mode import prefect_server_process

    with prefect_server_process(tmp_path) as (api, env):
        yield api, env


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
