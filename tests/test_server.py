"""The background Prefect server, for real: `promptfleet` commands as subprocesses with a
PREFECT_HOME of their own and no PREFECT_API_URL, as a new user has them. Every test
stops what it started, and checks that nothing of it is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from promptfleet.orchestration import server
from promptfleet.orchestration.crashed_runs import DEFAULT_SILENCE, SILENCE_ENV, automation_name, crash_silence
from tests.conftest import write_jsonl

PROMPTFLEET = [shutil.which("promptfleet", path=str(Path(sys.executable).parent)) or "promptfleet"]
TWENTY = [{"id": i, "api": "test", "model_name": "test-m", "prompt": f"q{i}"} for i in range(20)]


def processes_of(home: Path) -> list[int]:
    """PIDs of live processes whose environment names this PREFECT_HOME (servers included)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in environ.split(b"\0") and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "prefect home"  # a space, as in many real home folders
    yield home
    server.stop(home)
    for pid in processes_of(home):  # whatever a failed test left behind
        os.kill(pid, signal.SIGKILL)
    assert server.status(home) is None


def cli(args: list[str], home: Path, cwd: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PROMPTFLEET_EPHEMERAL")}
    environ.update(PREFECT_HOME=str(home), **env)
    return subprocess.run(PROMPTFLEET + args, env=environ, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def api(info: server.ServerInfo, path: str, body: dict) -> list[dict]:
    return httpx.post(f"{info.api_url}{path}", json=body, timeout=10).json()


@pytest.mark.slow
def test_first_run_starts_the_server_later_runs_reuse_it_and_the_run_stays_in_the_ui(tmp_path: Path, home: Path):
    path = write_jsonl(tmp_path / "twenty.jsonl", TWENTY)
    (tmp_path / "data").mkdir()
    assert cli(["server", "status"], home, tmp_path).returncode == 1

    first = cli(["run", "-f", str(path), "-mq", "60000"], home, tmp_path, OPENAI_API_KEY="sk-not-for-the-server-000000")
    assert first.returncode == 0, first.stderr[-3000:]
    info = server.status(home)
    assert info is not None and server.healthy(info.api_url)  # still up after the command ended
    assert b"sk-not-for-the-server" not in Path(f"/proc/{info.pid}/environ").read_bytes()  # a long-lived process holds no keys
    [starting] = [line for line in first.stderr.splitlines() if line.startswith("starting Prefect server")]
    assert starting == f"starting Prefect server at {info.ui_url} (first time ~15 s) — stop with `promptfleet server stop`"
    assert "Traceback" not in first.stderr

    # the flow run, its task run per queue and its artifacts are in the API after the exit
    [link] = [line.split()[-1] for line in first.stdout.splitlines() if line.strip().startswith("prefect ")]
    assert link.startswith(f"{info.ui_url}/runs/flow-run/")
    flow_run_id = link.rsplit("/", 1)[1]
    [flow_run] = api(info, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert flow_run["name"] == "twenty" and flow_run["state_type"] == "COMPLETED"
    deadline = time.monotonic() + 20  # task runs arrive as events, recorded asynchronously
    while time.monotonic() < deadline:
        tasks = {t["name"] for t in api(info, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})}
        if "all" in tasks and len(tasks) >= 3:
            break
        time.sleep(0.5)
    assert "all" in tasks and any(t.startswith("write_results") for t in tasks)
    artifacts = {a["key"]: a for a in api(info, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})}
    assert "20 answered, 0 failed" in artifacts["summary-twenty"]["data"]
    assert artifacts["progress-twenty"]["data"] == 100.0
    automations = httpx.post(f"{info.api_url}/automations/filter", json={}, timeout=10).json()
    assert [a["name"] for a in automations] == [automation_name(DEFAULT_SILENCE)]  # set up by the first run, once

    second = cli(["run", "-f", str(path), "-mq", "60000"], home, tmp_path, PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="INFO")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "starting Prefect server" not in second.stderr
    assert second.stderr.count("View at ") == 1  # Prefect logs the link twice; people see it once
    assert server.status(home) == info  # the same server, reused

    status = cli(["server", "status"], home, tmp_path)
    assert status.returncode == 0 and f"{info.ui_url} (pid {info.pid}" in status.stdout and "answering" in status.stdout
    stopped = cli(["server", "stop"], home, tmp_path)
    assert stopped.returncode == 0 and f"pid {info.pid}" in stopped.stdout
    assert server.status(home) is None and processes_of(home) == []
    assert not (home / server.STATE_FILE).exists() and not (home / server.PREFECT_PID_FILE).exists()
    assert cli(["server", "stop"], home, tmp_path).stdout.strip() == "no background Prefect server running"


@pytest.mark.slow
def test_a_stale_state_file_is_recognised_a_taken_port_avoided_and_a_run_killed_with_9_marked_crashed(tmp_path: Path, home: Path):
    home.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (home / server.STATE_FILE).write_text(json.dumps({"pid": int(dead.stdout), "port": 4200, "started": "yesterday"}))
    (home / server.PREFECT_PID_FILE).write_text(dead.stdout)  # as a kill -9 of the server leaves them

    status = cli(["server", "status"], home, tmp_path)
    assert status.returncode == 1 and "no background Prefect server running" in status.stdout
    assert not (home / server.STATE_FILE).exists() and not (home / server.PREFECT_PID_FILE).exists()

    with socket.socket() as preferred, socket.socket() as mine:
        for held in (preferred, mine):  # two ports taken: the one Prefect's setting prefers, and one we ask for
            held.bind(("127.0.0.1", 0))
            held.listen()
        taken, port = preferred.getsockname()[1], mine.getsockname()[1]
        refused = cli(["server", "start", "--port", str(port)], home, tmp_path)
        assert refused.returncode == 1
        assert refused.stderr.strip() == f"cannot start the Prefect server: port {port} on 127.0.0.1 is taken; choose another with --port"

        started = cli(["server", "start"], home, tmp_path, PREFECT_SERVER_API_PORT=str(taken))
        assert started.returncode == 0, started.stderr[-3000:]
        info = server.status(home)
        assert info is not None and info.port not in (taken, port) and server.healthy(info.api_url)
        assert f"{info.ui_url} (pid {info.pid})" in started.stdout
        again = cli(["server", "start"], home, tmp_path)
        assert "already running" in again.stdout and server.status(home) == info
    _a_run_killed_with_9_is_marked_crashed(info, home, tmp_path)  # a fresh server: no run has been on it


def _a_run_killed_with_9_is_marked_crashed(info: server.ServerInfo, home: Path, tmp_path: Path) -> None:
    """The first run on a fresh server sets up the automation, and is watched by it itself
    even when it dies seconds later, before it would say it is alive again."""
    silence = 30  # the operator's setting, half the default: a word every 7.5 s
    rows = [{"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}", "parameters": {"latency": 1.0}} for i in range(600)]
    path = write_jsonl(tmp_path / "doomed.jsonl", rows)
    environ = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PROMPTFLEET_EPHEMERAL")}
    environ.update(PREFECT_HOME=str(home), PROMPTFLEET_CRASH_SILENCE=str(silence))
    cmd = PROMPTFLEET + ["run", "-f", str(path), "-d", str(tmp_path / "data"), "--create-data-folder", "-mq", "600"]
    proc = subprocess.Popen(cmd, env=environ, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        runs: list[dict] = []
        while time.monotonic() < deadline and not (runs and runs[0]["state_type"] == "RUNNING"):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            runs = api(info, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["doomed"]}}})
            time.sleep(0.5)
        assert runs and runs[0]["state_type"] == "RUNNING"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (automations := api(info, "/automations/filter", {})):
            time.sleep(0.5)
        assert [a["name"] for a in automations] == [automation_name(timedelta(seconds=silence))]
        time.sleep(4)  # after its word 2 s after setting the automation up, before its next, 7.5 s after its first
    finally:
        proc.kill()
        proc.wait()
    killed = time.monotonic()
    while time.monotonic() < killed + 5 * silence:
        [run] = api(info, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["doomed"]}}})
        if run["state_type"] != "RUNNING":
            break
        time.sleep(2)
    assert run["state_type"] == "CRASHED", run["state_type"]
    assert time.monotonic() - killed < 2 * silence


def test_the_crash_silence_is_a_setting_of_60_s_by_default(monkeypatch):
    monkeypatch.delenv(SILENCE_ENV, raising=False)
    assert crash_silence() == DEFAULT_SILENCE == timedelta(seconds=60)
    monkeypatch.setenv(SILENCE_ENV, "12.5")
    assert crash_silence() == timedelta(seconds=12.5)
    for bad in ("soon", "1", "-60", "nan"):
        monkeypatch.setenv(SILENCE_ENV, bad)
        with pytest.raises(ValueError, match=f"{SILENCE_ENV} must be a number of seconds, at least 4, not '{bad}'"):
            crash_silence()


@pytest.mark.slow
def test_kill_9_of_an_ephemeral_run_leaves_no_server_behind(tmp_path: Path, home: Path):
    rows = [{"id": i, "api": "test", "model_name": "m", "prompt": f"q{i}", "parameters": {"latency": 0.5}} for i in range(200)]
    path = write_jsonl(tmp_path / "slow.jsonl", rows)
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environ.update(PREFECT_HOME=str(home), PROMPTFLEET_EPHEMERAL="1")
    cmd = PROMPTFLEET + ["run", "-f", str(path), "-d", str(tmp_path / "data"), "--create-data-folder", "-mq", "600"]
    proc = subprocess.Popen(cmd, env=environ, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not list((tmp_path / "data" / "output").glob("slow/*-completed-slow.jsonl")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        servers = [pid for pid in processes_of(home) if pid != proc.pid]
        assert servers, "the temporary server was not found"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30  # the kernel sends SIGTERM; uvicorn takes a moment to stop
    while time.monotonic() < deadline and processes_of(home):
        time.sleep(0.2)
    assert processes_of(home) == []
    assert server.status(home) is None  # a temporary server never writes the state file


def test_the_crash_automation_watches_every_promptfleet_flow():
    """A flow missing from OUR_FLOWS would stay Running for ever once its process died."""
    import importlib
    import pkgutil

    from prefect import Flow

    import promptfleet.orchestration.flows as flows
    from promptfleet.orchestration.crashed_runs import OUR_FLOWS

    ours = {obj.name for info in pkgutil.iter_modules(flows.__path__)
            for obj in vars(importlib.import_module(f"{flows.__name__}.{info.name}")).values() if isinstance(obj, Flow)}  # fmt: skip
    assert ours == set(OUR_FLOWS)


def test_prefect_clients_of_our_plain_http_server_load_one_certificate(tmp_path: Path, monkeypatch):
    """Every Prefect client builds a TLS context (six per run, ~25 ms each with certifi's
    bundle); for our http://127.0.0.1 server it is never used, so one certificate will do."""
    import ssl

    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    env = server.plain_http_env(tmp_path)
    bundle = Path(env["PREFECT_API_SSL_CERT_FILE"])
    assert bundle.parent == tmp_path and bundle.read_text().count("BEGIN CERTIFICATE") == 1
    assert ssl.create_default_context(cafile=str(bundle)).cert_store_stats()["x509_ca"] == 1  # as Prefect's client builds it
    assert server.plain_http_env(tmp_path) == env and [p.name for p in tmp_path.iterdir()] == [bundle.name]  # made once, no temporary left
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", "/etc/my-company-ca.pem")
    assert server.plain_http_env(tmp_path) == {}  # the user's own bundle is kept


def test_a_full_prefect_home_costs_the_cheap_bundle_not_the_run(tmp_path: Path, monkeypatch):
    """Disk full while the one-certificate bundle is written: no bundle, no temporary left,
    and Prefect's own default is used; a home named with spaces and accents works."""
    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    home = tmp_path / "dossier Prefect é"
    home.mkdir()

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert server.plain_http_env(home) == {}
    assert list(home.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    assert Path(server.plain_http_env(home)["PREFECT_API_SSL_CERT_FILE"]).parent == home
