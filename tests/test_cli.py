"""The command line: exit codes, refusing bad input, the flow, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

runner = CliRunner()
GOOD = {"api": "test", "model_name": "m", "prompt": "hi"}
REPO = Path(__file__).resolve().parents[1]


def test_check_clean_file_exits_zero_and_shows_queues(tmp_path: Path):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD, {**GOOD, "api": "test", "group": "g"}])
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data"), "-p", "-mq", "30"])
    assert result.exit_code == 0, result.output
    assert "queue test: 1 prompt(s) at 30/min" in result.output
    assert "queue g: 1 prompt(s) at 30/min" in result.output


def test_check_bad_file_names_line_and_field_and_missing_env(tmp_path: Path):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD, {"api": "test", "prompt": "x"}, "{oops", {**GOOD, "api": "openai"}])
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data"), "-e", str(tmp_path / "none.env")])
    assert result.exit_code == 1
    assert f"{path}:2: model_name: is required" in result.output
    assert f"{path}:3: invalid JSON" in result.output
    assert "openai/m needs OPENAI_API_KEY" in result.output


def test_check_reads_the_env_file(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    env = tmp_path / "keys.env"
    env.write_text("OPENAI_API_KEY=sk-from-env-file-123456\n")
    path = write_jsonl(tmp_path / "exp.jsonl", [{**GOOD, "api": "openai"}])
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data"), "-e", str(env)])
    assert result.exit_code == 0, result.output
    assert "sk-from-env-file" not in result.output


def test_run_refuses_bad_file_and_leaves_everything_in_place(tmp_path: Path):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD, {**GOOD, "parameters": "hot"}])
    data = tmp_path / "data"
    data.mkdir()
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(data), "-m"])
    assert result.exit_code == 1
    assert f"{path}:2: parameters: must be an object" in result.output
    assert path.exists() and not (data / "input").exists() and not (data / "output").exists()


def test_run_executes_the_flow_and_writes_prompto_layout(tmp_path: Path, prefect_api: str):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD, {**GOOD, "prompt": ["a", "b"]}, {**GOOD, "parameters": {"fail_status": 400}}])
    data = tmp_path / "data"
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(data), "--output-as-csv", "-p", "--create-data-folder"])
    assert result.exit_code == 0, result.output
    assert "exp: 3 prompts, 2 answered, 1 failed" in result.output
    [out] = (data / "output").iterdir()
    names = sorted(p.name.split("-", 6)[-1] for p in out.iterdir() if not p.name.startswith("."))  # .lock: the owner lock
    assert names == ["completed-exp.csv", "completed-exp.jsonl", "failed-exp.jsonl", "input-exp.jsonl",
                     "log-exp.txt", "manifest-exp.json", "report-exp.html", "results-exp.parquet", "run-exp.json"]  # fmt: skip
    assert path.exists() and not (data / "input" / "exp.jsonl").exists()  # copied in, then moved to output
    log = next(out.glob("*-log-exp.txt")).read_text()
    assert "queue test: 3 prompts" in log and "failed after 1 attempt(s)" in log


def test_flow_records_one_task_per_queue(tmp_path: Path, prefect_api: str):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
    )

    from promptfleet.core.config import Settings
    from promptfleet.orchestration.flows.run_experiment import run_experiment

    rows = [{**GOOD, "model_name": "a"}, {**GOOD, "group": "g1"}, {**GOOD, "group": "g2"}]
    path = write_jsonl(tmp_path / "multi.jsonl", rows)
    summary = asyncio.run(run_experiment(file=str(path), settings=Settings(data_folder=tmp_path / "data", parallel=True)))
    assert summary.complete and summary.answered == 3

    async def task_names() -> list[str]:
        async with get_client() as client:
            [flow_run] = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["multi"])))
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            parameters.update(flow_run.parameters)
            return [r.name for r in runs]

    parameters: dict = {}

    # Task runs reach the server as events, recorded asynchronously: give it a moment.
    deadline = time.monotonic() + 15
    names = asyncio.run(task_names())
    while (len(names) < 5 or not {"g1", "g2", "test"} <= set(names)) and time.monotonic() < deadline:
        time.sleep(0.2)
        names = asyncio.run(task_names())
    assert sorted(n for n in names if not n.startswith(("load_and_validate", "write_results"))) == ["g1", "g2", "test"]
    assert len(names) == 5
    # The UI shows the run's parameters as JSON, the settings a dict (flows/lean.py, not FastAPI's encoder)
    assert parameters["file"] == str(path) and parameters["move_to_input"] is False
    assert parameters["settings"]["data_folder"] == str(tmp_path / "data") and parameters["settings"]["parallel"] is True


def test_a_run_does_not_import_fastapi(tmp_path: Path, prefect_api: str):
    """Prefect's own parameter encoding imports FastAPI at every flow call (~170 ms of a run)."""
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD])
    script = (
        "import sys; from promptfleet.cli import main; sys.argv = ['promptfleet', 'run', '-f', sys.argv[1], '-d', sys.argv[2], '--create-data-folder']\n"
        "try:\n    main()\nexcept SystemExit as done:\n    print('exit', done.code, 'fastapi' in sys.modules)"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split()[-3:] == ["exit", "0", "False"], done.stdout + done.stderr


@pytest.mark.slow
def test_resume_after_kill_9_answers_each_prompt_once(tmp_path: Path, prefect_api: str):
    n = 60
    with FakeServer() as server:
        server.state.latency = 0.1
        path = write_jsonl(tmp_path / "exp.jsonl", [{"id": i, "api": "openai", "model_name": "gpt-fake", "prompt": f"q{i}"} for i in range(n)])
        data = tmp_path / "data"
        env = {**os.environ, "OPENAI_API_KEY": "sk-kill-test-000000", "OPENAI_BASE_URL": server.base_url, "PREFECT_API_URL": prefect_api}
        cmd = [sys.executable, "-m", "promptfleet.cli", "run", "-f", str(path), "-d", str(data), "-mq", "900", "--create-data-folder"]  # 15/s: ~4 s

        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sum(server.state.calls.values()) < n // 3:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        sent_before = sum(server.state.calls.values())
        [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
        answered_before = len(read_jsonl(completed))
        assert 0 < answered_before < n

        finished = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, timeout=180)
        assert finished.returncode == 0, finished.stderr.decode()[-2000:]

    records = read_jsonl(completed)
    lines = Counter(r["input_line"] for r in records)
    assert sorted(lines) == list(range(1, n + 1)) and max(lines.values()) == 1  # all there, none twice
    resent = [p for p, c in server.state.calls.items() if c > 1]
    # Only prompts in flight at the kill (sent but not journaled) may be sent again.
    assert len(resent) <= sent_before - answered_before
    assert sum(server.state.calls.values()) == n + len(resent)
    assert json.loads(next((data / "output" / "exp").glob("*-run-exp.json")).read_text())["finished"]
