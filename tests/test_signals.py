"""SIGTERM means Ctrl-C: stop sending, let in-flight answers land (up to the grace,
by default the request timeout), journal them, exit 130 with the resume line and no
traceback. Through real subprocesses; requests counted at the fake server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer, Scripted


def rows(n: int) -> list[dict]:
    return [{"api": "openai", "model_name": "gpt-fake", "prompt": f"q{i}"} for i in range(n)]


def environment(server: FakeServer, api: str) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": "sk-signal-test-000000", "OPENAI_BASE_URL": server.base_url, "PREFECT_API_URL": api}


def wait_for_calls(server: FakeServer, proc: subprocess.Popen, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sum(server.state.calls.values()) < count:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        time.sleep(0.05)


def assert_each_answered_once(completed: Path, n: int, server: FakeServer) -> None:
    lines = Counter(r["input_line"] for r in read_jsonl(completed))
    assert sorted(lines) == list(range(1, n + 1)) and max(lines.values()) == 1
    assert len(server.state.calls) == n and max(server.state.calls.values()) == 1  # none paid twice


@pytest.mark.slow
def test_sigterm_run_drains_in_flight_exits_130_without_traceback(tmp_path: Path, prefect_api: str):
    n = 40
    with FakeServer() as server:
        server.state.latency = 0.5
        path = write_jsonl(tmp_path / "exp.jsonl", rows(n))
        data = tmp_path / "data"
        cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(data), "-mq", "600"]
        proc = subprocess.Popen(cmd, env=environment(server, prefect_api), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_calls(server, proc, 8)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        err = err.decode()
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err and "TerminationSignal" not in err
        assert f"promptfleet run -f {path} -d {data} -mq 600" in err  # the resume line
        sent = sum(server.state.calls.values())
        assert sent < n
        [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
        assert len(read_jsonl(completed)) == sent  # every request that went out was journaled

        finished = subprocess.run(cmd, env=environment(server, prefect_api), cwd=tmp_path, capture_output=True, timeout=180)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    assert_each_answered_once(completed, n, server)


@pytest.mark.slow
def test_sigterm_pipeline_gives_its_file_back_and_the_next_start_finishes_it(tmp_path: Path, prefect_api: str):
    n = 40
    with FakeServer() as server:
        server.state.latency = 0.5
        data = tmp_path / "data"
        write_jsonl(data / "input" / "exp.jsonl", rows(n))
        cmd = [sys.executable, "-m", "promptfleet.cli", "pipeline", "-d", str(data), "-mq", "600", "--poll-interval", "60"]
        proc = subprocess.Popen(cmd, env=environment(server, prefect_api), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_calls(server, proc, 8)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        err = err.decode()
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err and "TerminationSignal" not in err
        assert "unfinished files are back in" in err
        assert (data / "input" / "exp.jsonl").exists()  # given back, not left in .running/
        assert [p.name for p in (data / "input" / ".running").iterdir()] == []  # no stale claim
        assert sum(server.state.calls.values()) < n

        once = [*cmd[:-2], "--once"]
        finished = subprocess.run(once, env=environment(server, prefect_api), cwd=tmp_path, capture_output=True, timeout=180)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
    assert_each_answered_once(completed, n, server)


@pytest.mark.slow
def test_ctrl_c_waits_for_slow_answers_up_to_the_request_timeout(tmp_path: Path, prefect_api: str):
    """15 s answers outlast the old hard-coded 10 s grace; the grace is now the timeout (60 s)."""
    n, slow = 12, 3
    with FakeServer() as server:
        for i in range(slow):
            server.state.script[f"q{i}"] = [Scripted("slow", retry_after=15)]
        path = write_jsonl(tmp_path / "exp.jsonl", rows(n))
        data = tmp_path / "data"
        cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(data), "-mq", "120", "--timeout", "60"]
        proc = subprocess.Popen(cmd, env=environment(server, prefect_api), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_calls(server, proc, slow)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err.decode()[-3000:]
        [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
        landed = {r["prompt"] for r in read_jsonl(completed)}
        assert {f"q{i}" for i in range(slow)} <= landed  # every slow in-flight answer was kept

        finished = subprocess.run(cmd, env=environment(server, prefect_api), cwd=tmp_path, capture_output=True, timeout=180)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    assert_each_answered_once(completed, n, server)
