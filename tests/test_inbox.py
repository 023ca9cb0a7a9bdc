"""The input folder as a work queue, and the `pipeline` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.core import inbox
from tests.conftest import read_jsonl, write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

GOOD = {"api": "test", "model_name": "m", "prompt": "hi"}


def test_waiting_files_oldest_first_and_only_experiments(tmp_path: Path):
    folder = tmp_path / "input"
    for i, name in enumerate(["b.jsonl", "a.csv", "notes.txt", ".hidden.jsonl"]):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("x\n")
        os.utime(folder / name, (1000 + i, 1000 + i))
    os.utime(folder / "a.csv", (900, 900))
    assert [p.name for p in inbox.waiting_files(folder)] == ["a.csv", "b.jsonl"]


def test_a_file_can_be_claimed_once(tmp_path: Path):
    path = write_jsonl(tmp_path / "input" / "exp.jsonl", [GOOD])
    first = inbox.claim(path)
    assert first.path == tmp_path / "input" / ".running" / "exp.jsonl" and first.path.exists()
    assert inbox.claim(path) is None  # the second poll finds it gone
    assert inbox.waiting_files(tmp_path / "input") == []
    back = inbox.release(first)
    assert back == path and path.exists() and not first.path.exists() and not first.holder.path.exists()


def test_orphans_of_dead_processes_are_put_back(tmp_path: Path):
    path = write_jsonl(tmp_path / "input" / "exp.jsonl", [GOOD])
    claimed = inbox.claim(path)
    assert inbox.requeue_orphans(tmp_path / "input") == []  # we are alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = claimed.path.with_name(".exp.jsonl.owner")
    owner.write_text(json.dumps({**json.loads(owner.read_text()), "pid": int(dead.stdout)}))
    assert inbox.requeue_orphans(tmp_path / "input") == [path]
    assert path.exists() and not owner.exists()


def test_pipeline_once_runs_good_files_and_rejects_bad_ones(tmp_path: Path, prefect_api: str):
    data = tmp_path / "data"
    write_jsonl(data / "input" / "one.jsonl", [GOOD, {**GOOD, "prompt": "again"}])
    write_jsonl(data / "input" / "bad.jsonl", [GOOD, {"api": "nope", "model_name": "m", "prompt": "x"}])
    result = CliRunner().invoke(app, ["pipeline", "-d", str(data), "--once", "-p", "--settle", "0"])
    assert result.exit_code == 0, result.output
    assert "one: 2 answered, 0 failed" in result.output
    assert len(read_jsonl(next((data / "output" / "one").glob("*-completed-one.jsonl")))) == 2
    [report] = (data / "rejected").glob("*-bad.jsonl.errors.txt")
    assert "bad.jsonl:2: api: unknown api 'nope'" in report.read_text()
    assert not list((data / "input").glob("*.jsonl")) and not list((data / "input" / ".running").iterdir())


def test_a_run_left_unfinished_by_a_dead_process_goes_back_to_the_inbox(tmp_path: Path):
    from promptfleet.core.rundir import RunLock

    inbox_dir, out = tmp_path / "input", tmp_path / "output"
    (inbox_dir / ".running").mkdir(parents=True)

    def stranded(name: str, finished: bool = False, source: Path | None = None) -> Path:
        folder = out / name
        folder.mkdir(parents=True)
        working = folder / f"20260101-000000-input-{name}.jsonl"
        working.write_text('{"prompt": "p", "api": "test", "model_name": "m"}\n')
        state = {"source": str(source or inbox_dir / ".running" / f"{name}.jsonl"), "finished": finished}
        (folder / f"20260101-000000-run-{name}.json").write_text(json.dumps(state))
        return working

    dead = stranded("dead run")  # its process is gone: nobody holds the lock
    stranded("done", finished=True)
    stranded("by hand", source=tmp_path / "elsewhere.jsonl")  # `promptfleet run`, not the inbox
    stranded("alive")
    held = RunLock(out / "alive")
    held.acquire()  # a live owner (this process, through another open file)
    try:
        back = inbox.requeue_stranded(inbox_dir, out)
        again = inbox.requeue_stranded(inbox_dir, out)
    finally:
        held.release()
    assert back == [inbox_dir / "dead run.jsonl"] and back[0].exists() and not dead.exists()
    assert again == []  # once
    assert sorted(p.name for p in inbox_dir.glob("*.jsonl")) == ["dead run.jsonl"]
