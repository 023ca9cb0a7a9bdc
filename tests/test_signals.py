"""SIGTERM means Ctrl-C: stop sending, let in-flight answers land (up to the grace,
by default the request timeout), journal them, exit 130 with the resume line and no
traceback. Through real subprocesses; requests counted at the fake server."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer, Scripted

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server


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
        path = write_jsonl(tmp_path / "stopped run.jsonl", rows(n))
        data = tmp_path / "data"
        data.mkdir()
        cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(data), "-mq", "600"]
        proc = subprocess.Popen(cmd, env=environment(server, prefect_api), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_calls(server, proc, 8)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        err = err.decode()
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err and "TerminationSignal" not in err
        assert shlex.join(["promptfleet", "run", "-f", str(path), "-d", str(data), "-mq", "600"]) in err  # the resume line
        sent = sum(server.state.calls.values())
        assert sent < n
        [completed] = (data / "output" / "stopped run").glob("*-completed-stopped run.jsonl")
        assert len(read_jsonl(completed)) == sent  # every request that went out was journaled
        assert flow_run_states(prefect_api, "stopped run") == ["CANCELLED"]  # the UI shows it stopped, not Completed

        finished = subprocess.run(cmd, env=environment(server, prefect_api), cwd=tmp_path, capture_output=True, timeout=180)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
        assert flow_run_states(prefect_api, "stopped run") == ["CANCELLED", "COMPLETED"]
    assert_each_answered_once(completed, n, server)


@pytest.mark.slow
def test_sigterm_of_a_study_leaves_it_cancelled_in_its_run_and_in_its_judging_and_each_rerun_pays_once(tmp_path: Path, prefect_api: str):
    """Stopped while its prompts are sent, then (rerun) while its answers are judged, then
    its judging resumed by `judge --run` and stopped by Ctrl-C: each stop leaves the study,
    and the step it stopped, Cancelled with nothing judged from a part; the last rerun
    finishes, every prompt and judge prompt paid once."""
    n = 30
    judges = tmp_path / "judges"
    judges.mkdir()
    (judges / "settings.json").write_text('{"fake-judge": {"api": "openai", "model_name": "gpt-judge"}}')
    (judges / "template.txt").write_text("Score 1-10: {INPUT_PROMPT} / {OUTPUT_RESPONSE}")
    with FakeServer() as server:
        server.state.latency = 0.5
        path = write_jsonl(tmp_path / "étude à deux.jsonl", rows(n))
        data = tmp_path / "data"
        data.mkdir()
        out = data / "output" / "étude à deux"
        cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(data), "-mq", "600",
               "--judge-folder", str(judges), "--judge", "fake-judge"]  # fmt: skip

        def stopped_after(calls: int, command: list[str] = cmd, sig: int = signal.SIGTERM) -> str:
            proc = subprocess.Popen(command, env=environment(server, prefect_api), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            wait_for_calls(server, proc, calls)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 130, err.decode()[-3000:]
            assert not list(out.glob("*-study-*"))  # nothing judged from a part
            return err.decode()

        stopped_after(6)  # while the run sends
        assert flow_run_states(prefect_api, "étude à deux") == ["CANCELLED"]
        assert flow_run_states(prefect_api, "study-étude à deux") == ["CANCELLED"]

        err = stopped_after(n + 6)  # the run finished; its answers are being judged
        assert "judge prompt(s) unfinished; to resume, run the same command again" in err, err[-3000:]
        assert flow_run_states(prefect_api, "étude à deux") == ["CANCELLED", "COMPLETED"]
        assert flow_run_states(prefect_api, "study-étude à deux") == ["CANCELLED", "CANCELLED"]
        [judging] = flow_run_states(prefect_api, "judging-étude à deux-", like=True)
        assert judging == "CANCELLED"

        [answers] = out.glob("*-completed-étude à deux.jsonl")
        judge_run = [sys.executable, "-m", "promptfleet.cli", "judge", "--run", str(answers), "-l", str(judges), "-j", "fake-judge",
                     "-d", str(data), "-mq", "600"]  # fmt: skip
        err = stopped_after(n + 12, judge_run, signal.SIGINT)  # the same judging, asked for by the other command
        assert "judge prompt(s) unfinished; to resume, run the same command again" in err, err[-3000:]
        assert flow_run_states(prefect_api, "judging-étude à deux-", like=True) == ["CANCELLED", "CANCELLED"]

        finished = subprocess.run(cmd, env=environment(server, prefect_api), cwd=tmp_path, capture_output=True, timeout=300)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
        assert flow_run_states(prefect_api, "study-étude à deux") == ["CANCELLED", "CANCELLED", "COMPLETED"]
        [completed] = out.glob("*-completed-étude à deux.jsonl")
        assert len(list(out.glob("*-study-étude à deux.parquet"))) == 1
    lines = Counter(r["input_line"] for r in read_jsonl(completed))
    assert sorted(lines) == list(range(1, n + 1)) and max(lines.values()) == 1
    [verdicts] = [p for p in out.parent.rglob("*-completed-judge-*.jsonl")]
    assert len(read_jsonl(verdicts)) == n
    assert len(server.state.calls) == 2 * n and max(server.state.calls.values()) == 1  # each prompt and each judge prompt paid once


def flow_run_states(api: str, name: str, like: bool = False) -> list[str]:
    import httpx

    named = {"like_": name} if like else {"any_": [name]}
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": named}, "sort": "EXPECTED_START_TIME_ASC"}).json()
    return [r["state"]["type"] for r in runs]


@pytest.mark.slow
def test_sigterm_pipeline_gives_its_file_back_and_the_next_start_finishes_it(tmp_path: Path, prefect_api: str):
    n = 40
    with FakeServer() as server:
        server.state.latency = 0.5
        data = tmp_path / "data"
        write_jsonl(data / "input" / "exp.jsonl", rows(n))
        cmd = [sys.executable, "-m", "promptfleet.cli", "pipeline", "-d", str(data), "-mq", "600", "--settle", "0", "--poll-interval", "60"]
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
def test_ctrl_c_waits_for_slow_answers_up_to_the_request_timeout_then_resume_sends_nothing_twice(tmp_path: Path, prefect_api: str):
    """15 s answers outlast the old hard-coded 10 s grace; the grace is now the timeout (60 s)."""
    n, slow = 12, 3
    with FakeServer() as server:
        for i in range(slow):
            server.state.script[f"q{i}"] = [Scripted("slow", retry_after=15)]
        path = write_jsonl(tmp_path / "exp.jsonl", rows(n))
        data = tmp_path / "data"
        cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(data), "-mq", "120", "--timeout", "60",
               "--create-data-folder"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=environment(server, prefect_api), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_calls(server, proc, slow)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err.decode()[-3000:]
        assert "to resume, run the same command again" in err.decode()
        assert not any((data / "input").iterdir())  # the inbox is only an inbox: the pipeline must not see this run
        assert list((data / "output" / "exp").glob("*-input-exp.jsonl"))
        [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
        landed = {r["prompt"] for r in read_jsonl(completed)}
        assert {f"q{i}" for i in range(slow)} <= landed  # every slow in-flight answer was kept
        assert sum(server.state.calls.values()) < n

        finished = subprocess.run(cmd, env=environment(server, prefect_api), cwd=tmp_path, capture_output=True, timeout=180)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
        assert b"(resumed)" in finished.stdout
    assert_each_answered_once(completed, n, server)  # a graceful stop lets in-flight answers land: nothing sent twice


@pytest.mark.slow
def test_cancelling_a_pipeline_run_under_a_worker_lets_answers_land_and_gives_the_file_back(tmp_path: Path, prefect_api: str):
    """Prefect cancellation SIGTERMs the flow-run process; Prefect's own handler would raise
    TerminationSignal mid-send. Ours stops sending, journals what is in flight, releases."""
    import httpx

    from tests.test_server_mode import PREFECT, REPO, clear_schedules, run, start_run

    api, env = prefect_api, {**os.environ, "PREFECT_API_URL": prefect_api}
    n = 80
    work = tmp_path / "project"
    data = work / "data"
    with FakeServer() as server:
        server.state.latency = 0.5
        os.utime(write_jsonl(data / "input" / "exp.jsonl", rows(n)), (time.time() - 60, time.time() - 60))  # settled
        env = {**env, "OPENAI_API_KEY": "sk-worker-test-000000", "OPENAI_BASE_URL": server.base_url}
        run([PREFECT, "work-pool", "create", "promptfleet", "--type", "process", "--overwrite"], env, work)  # the session's server
        run([PREFECT, "--no-prompt", "deploy", "--name", "pipeline", "--prefect-file", str(REPO / "deployments" / "prefect.yaml")], env, work)
        flow_run_id = start_run(api, "watch_input/pipeline", {"settings": {"data_folder": "data", "max_queries": 600}})["id"]
        # The deployment polls every 60 s: runs its schedule made would poll the same inbox
        # with the default -mq and take the file first (the cancelled run then finds nothing).
        clear_schedules(api, "watch_input/pipeline")
        deployment_id = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["deployment_id"]
        scheduled = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}).json()
        for other in (r["id"] for r in scheduled if r["id"] != flow_run_id):
            httpx.delete(f"{api}/flow_runs/{other}").raise_for_status()
        log = (tmp_path / "worker.log").open("wb")

        def start_worker() -> subprocess.Popen:
            return subprocess.Popen([PREFECT, "worker", "start", "--pool", "promptfleet", "--run-once"], env=env, cwd=work,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

        worker = start_worker()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum(server.state.calls.values()) < 8:
                if worker.poll() is not None:
                    # A --run-once worker that polled before the run was due exits having run
                    # nothing; one that ran it and ended is a failure.
                    state = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]["type"]
                    assert state == "SCHEDULED", f"{state}: " + (tmp_path / "worker.log").read_text()[-3000:]
                    worker = start_worker()
                time.sleep(0.1)
            cancelling = httpx.post(f"{api}/flow_runs/{flow_run_id}/set_state", json={"state": {"type": "CANCELLING"}})
            assert cancelling.json()["status"] == "ACCEPT", cancelling.text
            worker.wait(timeout=120)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            log.close()
        output = (tmp_path / "worker.log").read_text()
        sent = sum(server.state.calls.values())
        assert sent < n, output[-3000:]
        assert "TerminationSignal" not in output and "Traceback" not in output, output[-5000:]
        assert (data / "input" / "exp.jsonl").exists(), output[-3000:]  # given back to the inbox
        assert [p.name for p in (data / "input" / ".running").iterdir()] == []
        [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
        assert len(read_jsonl(completed)) == sent  # every answer in flight at the cancel was kept

        once = [sys.executable, "-m", "promptfleet.cli", "pipeline", "-d", str(data), "-mq", "3000", "--settle", "0", "--once"]
        assert httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]["type"] == "CANCELLED"
        finished = subprocess.run(once, env=env, cwd=work, capture_output=True, timeout=180)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    assert_each_answered_once(completed, n, server)


@pytest.mark.parametrize(("grace", "landed"), [(0.2, 0), (None, 3)])
async def test_the_grace_after_a_stop_is_a_setting_defaulting_to_the_request_timeout(tmp_path: Path, grace, landed):
    import asyncio

    from promptfleet import Experiment, Session, Settings

    slow = [{"api": "test", "model_name": "m", "prompt": f"p{i}", "parameters": {"latency": 1.5}} for i in range(3)]
    settings = Settings(data_folder=tmp_path / "data", timeout=30, grace=grace)
    assert settings.stop_grace == (30 if grace is None else grace)
    session = Session()
    running = asyncio.create_task(Experiment(write_jsonl(tmp_path / "exp.jsonl", slow), settings, session=session).process())
    while not session.runs or sum(s.in_flight for s in session.runs[0].stats.values()) < 3:
        await asyncio.sleep(0.01)
    session.request_stop()
    summary = await running
    assert summary.answered == landed  # 1.5 s answers: abandoned after 0.2 s, kept within the 30 s timeout


def test_kill_9_of_promptfleet_worker_stops_the_prefect_worker_it_started(tmp_path: Path, prefect_api: str):
    """The wrapper is what a supervisor watches; killed hard, it must not leave Prefect's
    worker polling with nobody to stop it."""
    from promptfleet.core import processes

    wrapper = subprocess.Popen([sys.executable, "-m", "promptfleet.cli", "worker", "--pool", "kill-9-test", "--type", "process"],
                               cwd=tmp_path, env={**os.environ, "PREFECT_API_URL": prefect_api},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    started: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not started:
            started = processes.children(wrapper.pid)
            time.sleep(0.1)
        assert started, "the wrapper started no worker"
        wrapper.kill()
        wrapper.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(processes.exists(pid) for pid in started):
            time.sleep(0.1)
        assert not any(processes.exists(pid) for pid in started)
    finally:
        wrapper.kill()
        for pid in started:
            if processes.exists(pid):
                os.kill(pid, signal.SIGKILL)
