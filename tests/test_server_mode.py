"""The README's "Run it as a service" recipe, step by step, on a fresh folder: the server
promptfleet starts (on a port other than 4200), the work pool, `deploy --all`, one
long-running worker, a file dropped into data/input/, a poll, `prefect deployment run` of a
file, the judge deployment's trigger — and every prompt and judge prompt counted at a local
fake OpenAI API: each paid once. One server and one worker serve the whole module."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import read_jsonl, stop_process, write_jsonl
from tests.fakes import FakeServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = shutil.which("prefect", path=str(BIN)) or "prefect"
PROMPTFLEET = shutil.which("promptfleet", path=str(BIN)) or "promptfleet"
PROMPTS = 2  # per experiment file; the judge runs at prompto's default 10/min


def free_port() -> int:
    import socket

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
        stop_process(server)
        log.close()


def run(cmd: list[str], env: dict, cwd: Path, timeout: float = 180) -> str:
    print(f"{time.strftime('%H:%M:%S')} {' '.join(cmd[1:4])}", flush=True)
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


# Each `prefect` command costs ~4 s of CPU (it imports all of Prefect): the README's steps
# are run as the README gives them, once each; repeats go to the API, as the CLI sends them.


def clear_schedules(api: str, deployment: str) -> None:
    """`prefect deployment schedule clear DEPLOYMENT -y`: test only, polls start when a test says."""
    found = api_call("GET", f"{api}/deployments/name/{deployment}")
    for schedule in found["schedules"]:
        api_call("DELETE", f"{api}/deployments/{found['id']}/schedules/{schedule['id']}")


def start_run(api: str, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """`prefect deployment run DEPLOYMENT --params ...`: a flow run of it, due now."""
    found = api_call("GET", f"{api}/deployments/name/{deployment}")
    return api_call("POST", f"{api}/deployments/{found['id']}/create_flow_run", json={"parameters": parameters})


def api_call(method: str, url: str, **kwargs: Any) -> Any:
    """One request to the Prefect API, asked again while the server answers busy (429, 502,
    503: SQLite was locked), as Prefect's own client does; the JSON answer."""
    for attempt in range(6):
        answer = httpx.request(method, url, timeout=30, **kwargs)
        if answer.status_code not in (429, 502, 503) or attempt == 5:
            answer.raise_for_status()
            return answer.json() if answer.content else None
        time.sleep(float(answer.headers.get("retry-after") or 2**attempt))


class Service:
    """The recipe's server, pool, deployments and worker, and what to ask them."""

    def __init__(self, work: Path, env: dict[str, str], api: str, fake: FakeServer, worker: subprocess.Popen, worker_log: Path):
        self.work, self.env, self.api, self.fake, self.worker, self.worker_log = work, env, api, fake, worker, worker_log

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def flow_runs(self) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", {"limit": 200})

    def settled(self, until=lambda runs: True, timeout: float = 240.0) -> list[dict[str, Any]]:
        """The flow runs once none is due or going (the 60 s schedule's next polls aside) and
        `until` holds; waits for the worker and for the judge trigger."""
        from datetime import datetime, timezone

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs, now = self.flow_runs(), datetime.now(timezone.utc)
            due = [r for r in runs if r["state_type"] in ("PENDING", "RUNNING") or r["state_type"] == "SCHEDULED"
                   and datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")) <= now]  # fmt: skip
            if not due and until(runs):
                return runs
            time.sleep(1)
        going = [(r["name"], r["state_type"]) for r in self.flow_runs() if r["state_type"] != "SCHEDULED"]
        pytest.fail(f"flow runs still going: {going}\nworker log:\n{self.worker_log.read_text()[-6000:]}")


def _final(runs: list[dict[str, Any]], prefix: str) -> int:
    return len([r for r in runs if r["name"].startswith(prefix) and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")])


def _openai_experiment(path: Path, tag: str, n: int = PROMPTS) -> Path:
    return write_jsonl(path, [{"id": f"{tag}-{i}", "prompt": f"{tag} question {i}", "api": "openai", "model_name": "gpt-fake"}
                              for i in range(n)])  # fmt: skip


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    root = Path(tempfile.mkdtemp(prefix="promptfleet-service-"))
    work = root / "project"  # a fresh clone's data folder: no input/ yet
    shutil.copytree(REPO / "data" / "examples", work / "data" / "examples")
    shutil.copytree(REPO / "data" / "judge", work / "data" / "judge")
    settings = json.loads((work / "data" / "judge" / "settings.json").read_text())
    settings["test-judge"] = {"api": "openai", "model_name": "judge-fake"}  # the judge is paid too, and counted
    (work / "data" / "judge" / "settings.json").write_text(json.dumps(settings))
    port = free_port()
    with FakeServer() as fake:
        env = {**os.environ, "PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "OPENAI_API_KEY": "sk-test-secret-0123456789", "OPENAI_BASE_URL": fake.base_url,
               "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}  # a worker that looks every second  # fmt: skip
        for name in ("PREFECT_API_URL", "PROMPTFLEET_EPHEMERAL", "PREFECT_LOGGING_EXTRA_LOGGERS"):
            env.pop(name, None)
        worker = None
        try:
            run([PROMPTFLEET, "server", "start", "--port", str(port)], env, work)
            api = f"http://127.0.0.1:{port}/api"
            env["PREFECT_API_URL"] = api
            run([PREFECT, "work-pool", "create", "promptfleet", "--type", "process"], env, work)
            run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(REPO / "deployments" / "prefect.yaml")], env, work)
            # a poll every 60 s costs a flow-run process each (~10 s of CPU here): the test asks for its polls
            clear_schedules(api, "watch_input/pipeline")
            with (root / "worker.log").open("wb") as log:
                worker = subprocess.Popen([PROMPTFLEET, "worker", "--pool", "promptfleet", "--grace", "20"], env=env, cwd=work,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            yield Service(work, env, api, fake, worker, root / "worker.log")
        finally:
            if worker is not None and worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)  # its flow runs too: the module is over
                worker.wait()
            subprocess.run([PROMPTFLEET, "server", "stop"], env=env, cwd=work, capture_output=True, timeout=60)
            shutil.rmtree(root, ignore_errors=True)


def test_the_service_recipe_pays_every_prompt_and_judge_prompt_once(service: Service):
    work, env = service.work, service.env
    input_folder = work / "data" / "input"
    assert not input_folder.exists()
    run([PROMPTFLEET, "check", "-f", "data/examples/quickstart.jsonl"], env, work)
    assert input_folder.is_dir()  # made by check: the README's `cp ... data/input/` works on a fresh clone

    # a dropped file, run by a poll ("polls now"; settle 0: the file is complete already), then judged
    _openai_experiment(input_folder / "dropped.jsonl", "dropped")
    fast = {"data_folder": "data", "parallel": True, "settle_seconds": 0, "max_queries": 600}
    run([PREFECT, "deployment", "run", "watch_input/pipeline", "--params", json.dumps({"settings": fast})], env, work)
    service.settled(until=lambda runs: _final(runs, "judging-dropped-") >= 1)
    # a file run on demand from the inbox, with a poll asked for at the same moment: one of them runs it
    _openai_experiment(input_folder / "ondemand.jsonl", "ondemand")
    on_demand = {"file": "data/input/ondemand.jsonl", "settings": fast}
    run([PREFECT, "deployment", "run", "run_experiment/run-experiment", "--params", json.dumps(on_demand)], env, work)
    start_run(service.api, "watch_input/pipeline", {"settings": fast})
    runs = service.settled(until=lambda runs: _final(runs, "judging-ondemand-") >= 1)

    for name in ("dropped", "ondemand"):
        [completed] = (work / "data" / "output" / name).glob(f"*-completed-{name}.jsonl")
        assert len(read_jsonl(completed)) == PROMPTS
        assert not (input_folder / f"{name}.jsonl").exists()  # taken out of the inbox, as a poll takes a file
        assert len(list((work / "data" / "output" / name).glob(f"*-study-{name}.parquet"))) == 1
    # every prompt and every judge prompt answered exactly once at the fake API
    answered = service.fake.state.answered
    assert len(answered) == 2 * PROMPTS * 2, sorted(answered)
    assert set(answered.values()) == {1}, [p for p, n in answered.items() if n > 1]

    by_state = {(r["name"], r["state_type"]) for r in runs}
    assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], by_state
    names = [r["name"] for r in runs]
    for name in ("dropped", "ondemand"):  # one judging per experiment, and names that say which run is which
        assert len([n for n in names if n.startswith(f"judging-{name}-")]) == 1, names
        assert len([n for n in names if n.startswith(f"judge-{name}-")]) == 1, names

    # asked again, by hand, twice at once: judged already, a line each, nothing sent, nothing failed
    [completed] = (work / "data" / "output" / "dropped").glob("*-completed-dropped.jsonl")
    judge = {"completed": str(completed.relative_to(work)), "settings": {"data_folder": "data"}}
    run([PREFECT, "deployment", "run", "judge_experiment/judge", "--params", json.dumps(judge)], env, work)
    start_run(service.api, "judge_experiment/judge", judge)
    runs = service.settled(until=lambda runs: _final(runs, "judging-dropped-") >= 3)
    again = [r for r in runs if r["name"].startswith("judging-dropped-")]
    assert len(again) == 3 and all(r["state_type"] == "COMPLETED" for r in again)
    assert any("judged with this setting already" in (r["state"]["message"] or "") for r in again)
    assert set(service.fake.state.answered.values()) == {1}


def test_a_worker_run_shows_promptfleet_log_lines_and_links_its_judging(service: Service):
    runs = service.settled()
    if not any(r["name"] == "dropped" for r in runs):
        pytest.skip("needs the recipe test's runs")
    run_ = next(r for r in runs if r["name"] == "dropped")
    deadline = time.monotonic() + 20  # logs are sent in batches
    while time.monotonic() < deadline:
        logs = service.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_["id"]]}}, "limit": 200})
        if any(log["name"].startswith("promptfleet") and "queue" in log["message"] for log in logs):
            break
        time.sleep(1)
    ours = [log["message"] for log in logs if log["name"].startswith("promptfleet")]
    assert any(f"{PROMPTS} prompts at" in m for m in ours) and any(f"{PROMPTS} answered" in m for m in ours), ours

    judging = next(r for r in runs if r["name"].startswith("judging-dropped-") and "already" not in (r["state"]["message"] or ""))
    assert "judges:dropped" in judging["tags"]
    artifacts = service.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_["id"], judging["id"]]}}})
    on_run = [a for a in artifacts if a["flow_run_id"] == run_["id"]]
    on_judging = [a for a in artifacts if a["flow_run_id"] == judging["id"]]
    assert any(judging["id"] in str(a["data"]) for a in on_run), on_run  # the judged run links its judging
    assert any(run_["id"] in str(a["data"]) for a in on_judging), on_judging  # and the other way round
    queues = next(a for a in artifacts if a["key"] == "queues-dropped")
    assert f"{PROMPTS}/{PROMPTS}" in queues["data"] and "finished" in queues["data"]


def test_the_ui_talks_to_the_server_it_is_served_by(service: Service):
    ui = service.api.removesuffix("/api")
    assert not ui.endswith(":4200")
    assert httpx.get(f"{ui}/ui-settings", timeout=10).json()["api_url"] == service.api
    runs = service.settled()
    from tests.browser import chromium as find_chromium

    chromium = find_chromium()
    run_ = next((r for r in runs if r["name"] == "dropped"), runs[0])
    profile = tempfile.mkdtemp(prefix="promptfleet-chromium-")
    try:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=15000", "--dump-dom", f"{ui}/runs/flow-run/{run_['id']}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert run_["name"] in done.stdout, done.stdout[-2000:]


def test_one_sigterm_stops_the_worker_once_its_run_stopped_keeping_what_landed(service: Service):
    """Last in the module: it stops the module's worker."""
    work, fake = service.work, service.fake
    fake.state.latency = 1.0
    path = _openai_experiment(work / "data" / "input" / "slow.jsonl", "slow", n=40)
    slow = {"file": "data/input/slow.jsonl", "settings": {"data_folder": "data", "max_queries": 120}}  # 2/s, each 1 s
    start_run(service.api, "run_experiment/run-experiment", slow)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(n for p, n in fake.state.answered.items() if p.startswith("slow")) < 4:
        time.sleep(0.2)
    service.worker.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    service.worker.wait(timeout=60)
    assert time.monotonic() - stopped < 20 + 15, "the worker outlived its runs' grace"
    sent = {p for p in fake.state.calls if p.startswith("slow")}
    answered = {p for p, n in fake.state.answered.items() if p.startswith("slow")}
    assert 4 <= len(answered) < 40 and answered == sent  # what was in flight at the SIGTERM landed
    [completed] = (work / "data" / "output" / "slow").glob("*-completed-slow.jsonl")
    assert {r["prompt"] for r in read_jsonl(completed)} == answered  # and every answer that landed was kept
    assert path.exists()  # back in the inbox: the next poll resumes it
    [flow_run] = [r for r in service.flow_runs() if r["name"] == "slow"]
    # ended by its own hand (not Crashed, not killed), and shown as stopped: prompts are left
    assert flow_run["state_type"] == "CANCELLED" and "unfinished" in str(flow_run["state"]), flow_run["state"]
    logs = service.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 200})
    assert any("(stopped)" in log["message"] for log in logs), [log["message"] for log in logs]
