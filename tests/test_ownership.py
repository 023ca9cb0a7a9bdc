"""One owner per run, an inbox that is only an inbox, claims of complete files only, and
resume after an edit: each case counts requests at a local fake, where "answered twice"
must be 0."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet import Experiment, Session, Settings
from promptfleet.cli import app
from promptfleet.core import inbox
from promptfleet.core.rundir import RunBusy, RunLock
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

KEY = "sk-ownership-test-000000"


def rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"id": i, "api": "openai", "model_name": "gpt-fake", "prompt": f"{prefix}{i}"} for i in range(n)]


def cli(path: Path, data: Path, server: FakeServer, api: str, *extra: str) -> tuple[list[str], dict]:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url, "PREFECT_API_URL": api}
    data.mkdir(parents=True, exist_ok=True)  # -d names an existing folder, as in prompto
    return [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(data), "-mq", "300", *extra], env


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def test_the_lock_names_its_owner_and_is_released_by_death(tmp_path: Path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunBusy, match=f"pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire()  # free again
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from promptfleet.core.rundir import RunLock; import time; RunLock(__import__('pathlib').Path({str(tmp_path / 'x')!r})).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline() == b"held\n"
    with pytest.raises(RunBusy, match=f"pid {holder.pid} "):
        RunLock(tmp_path / "x").acquire()
    holder.kill()  # kill -9: the OS drops the flock, no stale claim
    holder.wait()
    RunLock(tmp_path / "x").acquire()


@pytest.mark.slow
def test_a_second_run_of_the_same_experiment_refuses_and_nothing_is_answered_twice(tmp_path: Path, prefect_api: str):
    with FakeServer() as server:
        path = write_jsonl(tmp_path / "same.jsonl", rows(100))
        data = tmp_path / "data"
        cmd, env = cli(path, data, server, prefect_api)
        slow = [*cmd[:-1], "60"]  # 1/s: still sending while the second one starts, however busy the machine
        first = subprocess.Popen(slow, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: sum(server.state.calls.values()) >= 2)
        second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, timeout=120)
        assert first.poll() is None  # refused while the first was sending
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130, first.stderr.read().decode()[-2000:]
    assert second.returncode == 1
    message = second.stderr.decode()
    assert f"cannot run same: it is being run by pid {first.pid} on " in message and "--wait" in message
    assert "Traceback" not in message
    assert max(server.state.calls.values()) == 1 and len(server.state.calls) < 100


@pytest.mark.slow
def test_a_pipeline_poll_never_takes_a_cli_run(tmp_path: Path, prefect_api: str):
    with FakeServer() as server:
        path = write_jsonl(tmp_path / "exp.jsonl", rows(100))
        data = tmp_path / "data"
        cmd, env = cli(path, data, server, prefect_api)
        running = subprocess.Popen([*cmd[:-1], "120"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: sum(server.state.calls.values()) >= 2)
        poll = subprocess.run(
            [sys.executable, "-m", "promptfleet.cli", "pipeline", "-d", str(data), "--once", "--settle", "0"],
            env=env, cwd=tmp_path, capture_output=True, timeout=120,
        )  # fmt: skip
        assert running.poll() is None  # the poll happened while the CLI run was sending
        running.send_signal(signal.SIGINT)
        assert running.wait(timeout=120) == 130
        calls = dict(server.state.calls)
        resumed = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, timeout=180)  # the printed resume command
    assert poll.returncode == 0 and b"after 0 run(s)" in poll.stderr, poll.stderr.decode()[-2000:]
    assert resumed.returncode == 0 and b"(resumed)" in resumed.stdout, resumed.stderr.decode()[-2000:]
    assert len(server.state.calls) == 100 and max(server.state.calls.values()) == 1 and len(calls) < 100
    assert not list(data.glob("input/*.jsonl"))


def test_judge_and_rephrase_files_are_written_beside_their_source(tmp_path: Path, prefect_api: str):
    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    result = CliRunner().invoke(app, ["run", "-f", str(repo / "data/examples/quickstart.jsonl"), "-d", str(data),
                                      "--create-data-folder", "--judge-folder", str(repo / "data/judge"), "--judge", "test-judge"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (data / "input").exists() or not list((data / "input").iterdir())
    assert len(list((data / "output" / "quickstart").glob("judge-quickstart-*.jsonl"))) == 1


def test_only_complete_files_are_claimed(tmp_path: Path):
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "half.jsonl").write_text('{"api": "test", "model_name": "m", "prompt": "a"}\n{"api": "te')  # mid-line
    (folder / "upload.jsonl.part").write_text('{"api": "test", "model_name": "m", "prompt": "a"}\n')
    (folder / "fresh.jsonl").write_text('{"api": "test", "model_name": "m", "prompt": "a"}\n')
    assert inbox.waiting_files(folder, settle_seconds=30) == []  # fresh.jsonl was written just now
    old = time.time() - 60
    for name in ("half.jsonl", "fresh.jsonl"):
        os.utime(folder / name, (old, old))  # as `cp -p` or `mv` from another disk leave them: complete, moved in
    assert [p.name for p in inbox.waiting_files(folder, settle_seconds=30)] == ["fresh.jsonl"]  # half.jsonl ends mid-line
    os.rename(folder / "upload.jsonl.part", folder / "upload.jsonl")  # the documented atomic drop
    assert sorted(p.name for p in inbox.waiting_files(folder, settle_seconds=0)) == ["fresh.jsonl", "upload.jsonl"]


def test_a_file_moved_into_the_inbox_is_taken_by_the_next_poll(tmp_path: Path):
    """Written elsewhere, then renamed in: its last write is older than the rename, so no
    settle time is waited; one still being written waits it out."""
    folder, elsewhere = tmp_path / "input", tmp_path / "staging"
    folder.mkdir()
    elsewhere.mkdir()
    write_jsonl(elsewhere / "done.jsonl", [{"api": "test", "model_name": "m", "prompt": "a"}])
    time.sleep(0.05)  # file times are coarse (a few ms): the rename comes later than the last write
    os.rename(elsewhere / "done.jsonl", folder / "done.jsonl")
    with (folder / "growing.jsonl").open("w") as fh:
        fh.write('{"api": "test", "model_name": "m", "prompt": "a"}\n')  # a whole line so far
        fh.flush()
        assert [p.name for p in inbox.waiting_files(folder, settle_seconds=30)] == ["done.jsonl"]


def test_a_file_written_in_two_halves_is_run_whole(tmp_path: Path, prefect_api: str):
    """Once: the first ten lines ran, the run was marked finished, lines 11-20 never sent."""
    data = tmp_path / "data"
    target = data / "input" / "halves.jsonl"
    lines = [json.dumps({"id": i, "api": "test", "model_name": "m", "prompt": f"p{i}"}) + "\n" for i in range(20)]
    target.parent.mkdir(parents=True)
    with target.open("w") as fh:
        fh.writelines(lines[:10])
        fh.flush()
        poll = CliRunner().invoke(app, ["pipeline", "-d", str(data), "--once", "--settle", "2"])
        assert poll.exit_code == 0 and "after 0 run(s)" in poll.output  # still being written
        fh.writelines(lines[10:])
    time.sleep(2.1)
    poll = CliRunner().invoke(app, ["pipeline", "-d", str(data), "--once", "--settle", "2"])
    assert "halves: 20 answered, 0 failed" in poll.output, poll.output


async def test_editing_an_unsent_line_keeps_the_answers_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with FakeServer() as server:
        server.state.latency = 0.02
        os.environ.update(OPENAI_API_KEY=KEY, OPENAI_BASE_URL=server.base_url)
        path = write_jsonl(tmp_path / "exp.jsonl", rows(40))
        settings = Settings(data_folder=tmp_path / "data", max_queries=1200)
        session = Session()

        async def stop_soon() -> None:
            while sum(server.state.calls.values()) < 10:
                await asyncio.sleep(0.01)
            session.request_stop()

        stopper = asyncio.create_task(stop_soon())
        first = await Experiment(path, settings, session=session).process()
        await stopper
        answered = {r["prompt"] for r in read_jsonl(Path(first.outputs["completed"]))}
        assert 0 < len(answered) < 40
        edited = rows(40)
        edited[39]["prompt"] = "a different last question"  # an unsent line changes
        write_jsonl(path, edited)
        with caplog.at_level(logging.WARNING, logger="promptfleet"):
            second = await Experiment(path, settings).process()
    assert second.resumed and second.complete and second.answered == 40
    assert f"{len(answered)} answered prompt(s) are unchanged and kept" in caplog.text
    assert max(server.state.calls.values()) == 1 and "q39" not in server.state.calls
    assert server.state.calls["a different last question"] == 1


async def test_an_input_that_grows_during_its_run_is_not_marked_finished(tmp_path: Path):
    from promptfleet.api import run_all
    from promptfleet.core.run import open_run

    path = write_jsonl(tmp_path / "exp.jsonl", [{"api": "test", "model_name": "m", "prompt": f"p{i}"} for i in range(5)])
    run = open_run(path, Settings(data_folder=tmp_path / "data"), session=Session())
    with run.paths.input.open("a") as fh:  # a writer still appending to the claimed file
        fh.write(json.dumps({"api": "test", "model_name": "m", "prompt": "late"}) + "\n")
    try:
        summary = await run_all(run)
    finally:
        await run.aclose()
    assert summary.answered == 5 and not summary.complete
    assert not json.loads(run.paths.state.read_text())["finished"]


def test_the_input_file_is_opened_at_most_three_times_whatever_the_queues(tmp_path: Path, prefect_api: str):
    """Planning, the working copy and sending: once each, for the CLI's pre-check and the
    flow together (the flow reuses the CLI's plan), with five queues."""
    data = tmp_path / "data"
    path = write_jsonl(tmp_path / "five.jsonl", [{"api": "test", "model_name": "m", "group": f"g{i % 5}", "prompt": f"p{i}"} for i in range(25)])
    watched = {str(path)}
    opens: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and watching and str(args[0]) in watched | {str(p) for p in data.glob("output/five/*-input-five.jsonl")}:
            opens.append(str(args[0]))

    watching = True
    sys.addaudithook(hook)  # audit hooks cannot be removed: the flag turns it off
    try:
        result = CliRunner().invoke(app, ["run", "-f", str(path), "-d", str(data), "-p", "--create-data-folder"])
    finally:
        watching = False
    assert result.exit_code == 0, result.output
    assert "five: 25 prompts, 25 answered" in result.output
    assert 2 <= len(opens) <= 3, opens  # at least the plan and the copy were seen, so the hook counts
