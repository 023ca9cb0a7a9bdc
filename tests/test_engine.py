"""The engine end to end without Prefect: retries, Retry-After, no retry on 4xx,
nothing lost, multi-turn, stop and resume."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from promptfleet import Experiment, Session, Settings
from promptfleet.api import run_all
from promptfleet.core.engine import (
    Prompt,
    QueueContext,
    QueueStats,
    RetryPolicy,
    run_queue,
)
from promptfleet.core.limiter import Pacer
from promptfleet.core.run import open_run
from promptfleet.core.rundir import Journal, RunPaths
from promptfleet.providers import Clients
from promptfleet.providers.base import ProviderOptions
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer, Scripted

FAST = RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.2)


def openai_rows(texts: list[str], **extra) -> list[dict]:
    return [{"id": i, "api": "openai", "model_name": "gpt-fake", "prompt": t, **extra} for i, t in enumerate(texts)]


async def run_file(path: Path, tmp: Path, policy: RetryPolicy = FAST, **settings) -> tuple[RunPaths, dict]:
    """Run a file through prepare/run_queue/finish with a fast retry policy."""
    settings = Settings(data_folder=tmp / "data", **{"max_queries": 60_000, "max_attempts": policy.max_attempts, **settings})
    run = open_run(path, settings, session=Session(), policy=policy)
    try:
        summary = await run_all(run)
    finally:
        await run.aclose()
    return summary.paths, summary


async def test_retries_with_backoff_until_success(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.script["flaky"] = [Scripted(500), Scripted(503)]
    paths, summary = await run_file(write_jsonl(tmp_path / "exp.jsonl", openai_rows(["flaky", "fine"])), tmp_path)
    [flaky] = [r for r in read_jsonl(paths.completed) if r["prompt"] == "flaky"]
    assert flaky["attempts"] == 3 and flaky["response"] == "answer to: flaky"
    assert openai_env.state.calls == Counter({"flaky": 3, "fine": 1})
    t = openai_env.state.times["flaky"]
    assert t[1] - t[0] >= 0.025 and t[2] - t[1] >= 0.05  # backoff doubles (with jitter in [d/2, d])
    assert summary.retries == 2 and summary.failed == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_fail_at_once_with_the_reason(tmp_path: Path, openai_env: FakeServer, status: int):
    openai_env.state.script["bad"] = [Scripted(status, body={"error": {"message": f"nope {status}", "type": "x"}})]
    paths, _ = await run_file(write_jsonl(tmp_path / "exp.jsonl", openai_rows(["bad"])), tmp_path)
    [failed] = read_jsonl(paths.failed)
    assert openai_env.state.calls["bad"] == 1
    assert failed["error"]["status"] == status and failed["error"]["attempts"] == 1
    assert f"nope {status}" in failed["error"]["message"]
    assert "response" not in failed and read_jsonl(paths.completed) == []


async def test_retry_after_is_honoured(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.script["limited"] = [Scripted(429, retry_after=0.5)]
    paths, summary = await run_file(write_jsonl(tmp_path / "exp.jsonl", openai_rows(["limited"])), tmp_path)
    t = openai_env.state.times["limited"]
    assert len(t) == 2 and t[1] - t[0] >= 0.5
    assert read_jsonl(paths.completed)[0]["attempts"] == 2
    assert summary.queues[0]["rate_limited"] == 1


async def test_gives_up_after_max_attempts(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.script["down"] = [Scripted(500)] * 10
    paths, _ = await run_file(write_jsonl(tmp_path / "exp.jsonl", openai_rows(["down"])), tmp_path)
    [failed] = read_jsonl(paths.failed)
    assert openai_env.state.calls["down"] == FAST.max_attempts == failed["error"]["attempts"]
    assert failed["error"]["type"] == "server"


async def test_malformed_body_and_timeouts_are_retried(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.script["garbled"] = [Scripted("malformed")]
    openai_env.state.script["slow"] = [Scripted("slow", retry_after=1.0)]
    paths, summary = await run_file(write_jsonl(tmp_path / "exp.jsonl", openai_rows(["garbled", "slow"])), tmp_path, timeout=0.3)
    assert [r["attempts"] for r in read_jsonl(paths.completed)] == [2, 2]
    assert summary.retries == 2


async def test_every_line_lands_exactly_once_with_mixed_failures(tmp_path: Path):
    rows = []
    for i in range(300):
        params = {}
        if i % 7 == 0:
            params = {"fail_status": 400}
        elif i % 5 == 0:
            params = {"fail_status": 503, "fail_attempts": 2}
        elif i % 11 == 0:
            params = {"fail_status": 500}
        elif i % 13 == 0:
            params = {"fail_status": 429, "fail_attempts": 1, "retry_after": 0.01}
        rows.append({"id": f"p{i}", "api": "test", "model_name": "m", "prompt": f"question {i}", "parameters": params, "keep": i})
    paths, summary = await run_file(write_jsonl(tmp_path / "exp.jsonl", rows), tmp_path)
    completed, failed = read_jsonl(paths.completed), read_jsonl(paths.failed)
    lines = Counter(r["input_line"] for r in completed + failed)
    assert set(lines) == set(range(1, 301)) and max(lines.values()) == 1
    assert {r["keep"] for r in failed} == {i for i in range(300) if i % 7 == 0 or (i % 5 and i % 11 == 0)}
    assert all(r["keep"] + 1 == r["input_line"] for r in completed + failed)
    assert summary.complete and summary.answered + summary.failed == 300
    assert paths.input.exists() and paths.parquet.exists()


async def test_failed_file_is_a_runnable_experiment(tmp_path: Path):
    rows = [{"id": 1, "api": "test", "model_name": "m", "prompt": "x", "parameters": {"fail_status": 400}}]
    paths, _ = await run_file(write_jsonl(tmp_path / "exp.jsonl", rows), tmp_path)
    retry = tmp_path / "retry.jsonl"
    retry.write_text(paths.failed.read_text().replace('"fail_status": 400', '"fail_status": 0'))
    paths2, summary = await run_file(retry, tmp_path)
    [done] = read_jsonl(paths2.completed)
    assert "error" not in done and done["response"].startswith("test reply")
    assert summary.failed == 0


async def test_multi_turn_sends_the_conversation_so_far(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.script["second"] = [Scripted(500)]
    rows = [{"id": "c", "api": "openai", "model_name": "gpt-fake", "prompt": ["first", "second", "third"]}]
    paths, _ = await run_file(write_jsonl(tmp_path / "exp.jsonl", rows), tmp_path)
    [done] = read_jsonl(paths.completed)
    assert done["response"] == ["answer to: first", "answer to: second", "answer to: third"]
    # the failed second turn was retried alone: 'first' was paid once
    assert openai_env.state.calls == Counter({"first": 1, "second": 2, "third": 1})
    last = openai_env.state.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert last[1]["content"] == "answer to: first"
    assert done["usage"] == {"input_tokens": 3, "output_tokens": 9}


async def test_chat_messages_and_parameters_reach_the_api(tmp_path: Path, openai_env: FakeServer):
    rows = [{"api": "openai", "model_name": "gpt-fake", "parameters": {"temperature": 0.1, "max_tokens": 5},
             "prompt": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hello"}]}]  # fmt: skip
    await run_file(write_jsonl(tmp_path / "exp.jsonl", rows), tmp_path)
    [request] = openai_env.state.requests
    assert request["messages"] == [{"role": "system", "content": "terse"}, {"role": "user", "content": "hello"}]
    assert request["temperature"] == 0.1 and request["max_tokens"] == 5
    assert openai_env.state.auth_headers == ["Bearer sk-test-secret-0123456789"]


async def test_api_key_never_reaches_outputs_or_logs(tmp_path: Path, openai_env: FakeServer):
    key = "sk-test-secret-0123456789"
    openai_env.state.script["leak"] = [Scripted(401, body={"error": {"message": f"Incorrect API key provided: {key}", "type": "x"}})]
    settings = Settings(data_folder=tmp_path / "data", max_queries=60_000)
    summary = await Experiment(write_jsonl(tmp_path / "exp.jsonl", openai_rows(["leak"])), settings).process()
    assert summary.failed == 1
    for path in (tmp_path / "data" / "output").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    failed = read_jsonl(Path(summary.outputs["failed"]))[0]
    assert "Incorrect API key provided: ***" in failed["error"]["message"]


async def test_stop_leaves_the_rest_resumable_and_resume_sends_nothing_twice(tmp_path: Path, openai_env: FakeServer):
    openai_env.state.latency = 0.02
    path = write_jsonl(tmp_path / "exp.jsonl", openai_rows([f"q{i}" for i in range(40)]))
    settings = Settings(data_folder=tmp_path / "data", max_queries=1200)  # 20/s: ~2 s in all
    session = Session()
    experiment = Experiment(path, settings, session=session)

    async def stop_soon() -> None:
        await asyncio.sleep(0.6)
        session.request_stop()

    stopper = asyncio.create_task(stop_soon())
    first = await experiment.process()
    await stopper
    assert not first.complete and 0 < first.answered < 40
    assert not settings.input_folder.exists()  # the inbox is only an inbox: the working copy sits with the outputs
    assert Path(first.outputs["input"]).exists() and path.exists()

    second = await Experiment(path, settings).process()
    assert second.resumed and second.complete and second.answered == 40
    assert first.outputs["completed"] == second.outputs["completed"]
    assert max(openai_env.state.calls.values()) == 1 and len(openai_env.state.calls) == 40
    lines = [r["input_line"] for r in read_jsonl(Path(second.outputs["completed"]))]
    assert sorted(lines) == list(range(1, 41))


async def test_run_queue_journals_each_answer_as_it_lands(tmp_path: Path):
    paths = RunPaths(tmp_path, "stamp", "exp")
    journal = Journal(paths)
    seen_during_run = []

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.05)
            seen_during_run.append(len(paths.completed.read_text().splitlines()))

    items = [Prompt(i, f"k{i}", {"api": "test", "model_name": "m", "prompt": f"p{i}", "parameters": {"latency": 0.01}}) for i in range(1, 21)]
    watcher = asyncio.create_task(watch())
    stats = QueueStats("q", 600)
    await run_queue(iter(items), QueueContext(Clients(ProviderOptions()), Pacer(600), journal, stats))
    watcher.cancel()
    journal.close()
    assert stats.answered == 20
    assert any(0 < n < 20 for n in seen_during_run)  # lines appeared while the queue was still running
    assert [json.loads(line)["input_line"] for line in paths.completed.read_text().splitlines()] == list(range(1, 21))


async def test_one_file_with_all_seven_apis_runs_in_parallel_queues(tmp_path: Path, monkeypatch):
    from tests.test_providers import APIS, provider_env

    with FakeServer() as server:
        for api in APIS:
            for name, value in provider_env(api, server.url).items():
                monkeypatch.setenv(name, value)
        rows = [{"id": f"{api}-{i}", "api": api, "model_name": f"{api}-model", "prompt": f"{api} question {i}"}
                for api in APIS for i in range(3)]  # fmt: skip
        rows.append({"id": "multi", "api": "anthropic", "model_name": "claude", "prompt": ["one", "two"]})
        path = write_jsonl(tmp_path / "exp.jsonl", rows)
        settings = Settings(data_folder=tmp_path / "data", parallel=True, max_queries=6000)
        summary = await Experiment(path, settings).process()

    assert summary.complete and summary.answered == len(rows) and summary.failed == 0
    assert {q["queue"] for q in summary.queues} == set(APIS)
    for record in read_jsonl(Path(summary.outputs["completed"])):
        expected = ["answer to: one", "answer to: two"] if record["id"] == "multi" else f"answer to: {record['prompt']}"
        assert record["response"] == expected, record
    assert max(server.state.calls.values()) == 1


def test_the_python_api_never_imports_prefect(tmp_path: Path):
    """The plain Python API reports to no server, so it has nothing to ask Prefect; importing
    it costs 1-3 s at the start of every queue on this machine (it once did, through the
    check for a shared rate)."""
    import subprocess
    import sys

    write_jsonl(tmp_path / "x.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": "q"} for i in range(3)])
    script = (
        "import asyncio, sys; from promptfleet import Experiment, Settings; "
        f"s = asyncio.run(Experiment({str(tmp_path / 'x.jsonl')!r}, Settings(data_folder={str(tmp_path / 'data')!r})).process()); "
        "print(s.answered, 'prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3", "False"]
