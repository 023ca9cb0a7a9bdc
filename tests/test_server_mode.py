"""Server mode for real: a `prefect server` on a free port with a temporary home, the
deployments from deployments/prefect.yaml, and a worker that runs the pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
PREFECT = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server_process(tmp_path: Path, extra_env: dict[str, str] | None = None, timeout: float = 90) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start` on a free port with a PREFECT_HOME of its own; yields the API
    URL and an environment pointing at it, and stops the server after."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail(f"prefect server did not start in {timeout:g} s")
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def prefect_server(tmp_path: Path):
    with prefect_server_process(tmp_path) as (api, env):
        yield api, env


def run(cmd: list[str], env: dict, cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_pipeline_deployment_runs_through_a_worker(tmp_path: Path, prefect_server):
    api, env = prefect_server
    work = tmp_path / "project"
    shutil.copytree(REPO / "data" / "examples", work / "data" / "input")
    shutil.copytree(REPO / "data" / "judge", work / "data" / "judge")
    write_jsonl(work / "data" / "input" / "broken.jsonl", [{"api": "test", "model_name": "m"}])

    run([PREFECT, "work-pool", "create", "promptfleet", "--type", "process"], env, work)
    run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "deployments" / "prefect.yaml")], env, work)
    # settle_seconds 0: the files were copied in a moment ago and are complete
    settings = {"data_folder": "data", "parallel": True, "settle_seconds": 0}
    run([PREFECT, "deployment", "run", "watch_input/pipeline", "--params", json.dumps({"settings": settings})], env, work)
    run([PREFECT, "worker", "start", "--pool", "promptfleet", "--run-once"], env, work, timeout=180)

    [out] = (work / "data" / "output").iterdir()
    assert out.name == "quickstart"
    completed = read_jsonl(next(out.glob("*-completed-quickstart.jsonl")))
    failed = read_jsonl(next(out.glob("*-failed-quickstart.jsonl")))
    assert len(completed) + len(failed) == 12 and len(failed) == 1
    rejected = list((work / "data" / "rejected").glob("*broken.jsonl.errors.txt"))
    assert rejected and "prompt: is required" in rejected[0].read_text()
    assert not any((work / "data" / "input").glob("*.jsonl"))

    flows = httpx.post(f"{api}/flow_runs/filter", json={}).json()
    by_name = {f["name"]: f for f in flows}
    assert by_name["quickstart"]["state_type"] == "COMPLETED"
    assert by_name["broken"]["state_type"] == "FAILED"  # the bad file shows up as a failed subflow
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [by_name["quickstart"]["id"]]}}}).json()
        if "test" in {t["name"] for t in tasks} and len(tasks) >= 3:
            break
        time.sleep(0.5)
    assert "test" in {t["name"] for t in tasks}  # one task run per queue (parallel: by api), named after it
    artifacts = httpx.post(f"{api}/artifacts/filter", json={}).json()
    assert {"summary-quickstart", "progress-quickstart"} <= {a["key"] for a in artifacts}
    summary = next(a for a in artifacts if a["key"] == "summary-quickstart")
    assert "11 answered, 1 failed" in summary["data"]
    deadline = time.monotonic() + 20  # events are written asynchronously
    while time.monotonic() < deadline:
        events = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"prefix": ["promptfleet."]}}}).json()
        if events.get("events"):
            break
        time.sleep(0.5)
    [event] = events["events"]
    assert event["event"] == "promptfleet.experiment.completed"
    assert event["resource"]["prefect.resource.id"] == "promptfleet.experiment.quickstart"
    assert event["payload"]["answered"] == 11 and json.dumps(event["payload"]["outputs"]).count("quickstart") >= 4

    # The judge deployment's trigger has scheduled a judge run of the finished experiment.
    [judge_deployment] = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["judge"]}}}).json()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        judged = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [judge_deployment["id"]]}}}).json()
        if judged:
            break
        time.sleep(0.5)
    assert judged, "the completed event did not trigger the judge deployment"
    run([PREFECT, "worker", "start", "--pool", "promptfleet", "--run-once"], env, work, timeout=180)
    states = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [judge_deployment["id"]]}}}).json()
    assert any(s["state_type"] == "COMPLETED" for s in states), [(s["state_type"], s["expected_start_time"], s["parameters"]) for s in states]
    [study] = out.glob("*-study-quickstart.parquet")
    assert (work / "data" / "output" / "judge-quickstart").is_dir()
