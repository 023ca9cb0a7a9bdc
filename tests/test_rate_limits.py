"""The closed loop against a server that enforces its own limit (through the real OpenAI
SDK), tokens per minute, queues sharing a pacer, and the budget stop. The pacer's own
rules are tested on a virtual clock in test_limiter.py."""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from pathlib import Path

import pytest

from promptfleet import Experiment, Session, Settings
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

N = 60
SERVER_LIMIT = 20  # requests per second at the fake: 1,200/min


@pytest.fixture
def limited(monkeypatch):
    with FakeServer() as server:
        server.state.limit, server.state.window = SERVER_LIMIT, 1.0
        server.state.latency = 0.01
        monkeypatch.setenv("OPENAI_API_KEY", "sk-rate-limit-test-0000")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        yield server


def rows(n: int = N, model: str = "gpt-limited", text: str = "q") -> list[dict]:
    return [{"id": i, "api": "openai", "model_name": model, "prompt": f"{text}{i}"} for i in range(n)]


async def run(tmp_path: Path, name: str, data: list[dict], session: Session | None = None, **settings) -> tuple[dict, float]:
    start = time.monotonic()
    experiment = Experiment(write_jsonl(tmp_path / f"{name}.jsonl", data), Settings(data_folder=tmp_path / "data", **settings), session=session)
    summary = await experiment.process()
    return summary, time.monotonic() - start


async def test_ceiling_far_above_the_real_limit_finds_it(tmp_path: Path, limited: FakeServer):
    # -mq 12,000/min is ten times what the server allows.
    summary, elapsed = await run(tmp_path, "exp", rows(), max_queries=12_000, max_attempts=10)
    assert summary.complete and summary.answered == N and summary.failed == 0
    ideal = N / SERVER_LIMIT  # 3 s
    # Bounds stated in docs/rate-limits.md: at most 30 429s (half the prompts: the cut waits for
    # 12 of the last 24 sends), time within 2.5x of the limit.
    assert limited.state.rejected <= 30, limited.state.rejected
    assert elapsed <= 2.5 * ideal + 1, elapsed
    assert summary.rate_limited == limited.state.rejected
    assert max(limited.state.calls.values()) <= 10


async def test_rate_limit_headers_keep_it_under_the_wall(tmp_path: Path, limited: FakeServer):
    limited.state.limit_headers = True
    summary, elapsed = await run(tmp_path, "exp", rows(), max_queries=12_000, max_attempts=10)
    assert summary.complete and summary.answered == N
    assert limited.state.rejected <= 5, limited.state.rejected  # the stated limit replaces the guess from the first answers
    assert elapsed <= 2 * N / SERVER_LIMIT + 1


async def test_two_experiments_on_one_model_and_key_share_the_limit(tmp_path: Path, limited: FakeServer):
    limited.state.limit = None  # measure what we send instead
    session = Session()  # one process: its runs share one pacer per model and key
    (a, _), (b, _) = await asyncio.gather(
        run(tmp_path, "a", rows(30, text="a"), session, max_queries=1200, parallel=True),
        run(tmp_path, "b", rows(30, text="b"), session, max_queries=1200, parallel=True),
    )
    assert a.complete and b.complete
    times = sorted(t for ts in limited.state.times.values() for t in ts)
    # 20/s in all, not 40/s (a few more where the first requests, opening their connections, arrive together)
    assert max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)) <= 24


async def test_tokens_per_minute_pace_long_prompts(tmp_path: Path, monkeypatch):
    long = "word " * 80  # ~100 tokens by the estimate, plus max_tokens 10
    data = [{"api": "test", "model_name": "m", "prompt": f"{long}{i}", "parameters": {"max_tokens": 10}} for i in range(20)]
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"test": {"rpm": 60_000, "tpm": 12_000}}))  # 200 tokens/s, a 2,000-token bucket
    fast, fast_time = await run(tmp_path, "fast", data, max_queries=60_000, parallel=True)
    slow, slow_time = await run(tmp_path, "slow", data, max_queries=60_000, parallel=True, max_queries_json=limits)
    assert fast.complete and slow.complete
    total = 20 * (len(long) // 4 + 1 + 10)
    assert slow_time >= (total - 2000) / 200 - 0.1 > fast_time


async def test_budget_stops_sending_and_the_rest_resumes(tmp_path: Path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"priced-model": {"input": 1_000_000, "output": 0}}))  # $1 per input token
    data = [{"api": "test", "model_name": "priced-model", "prompt": f"two words{i}", "parameters": {"latency": 0.05}} for i in range(40)]
    path = write_jsonl(tmp_path / "exp.jsonl", data)
    settings = Settings(data_folder=tmp_path / "data", max_queries=600, prices=prices, max_cost=10)
    first = await Experiment(path, settings).process()
    assert not first.complete and first.budget_stop and "max-cost" in first.budget_stop
    assert 5 <= first.answered < 10  # $2 an answer: stops at $10, in-flight ones still land
    assert first.cost.estimated_usd >= 10
    second = await Experiment(path, settings.model_copy(update={"max_cost": None})).process()
    assert second.complete and second.resumed and second.answered == 40
    lines = [r["input_line"] for r in read_jsonl(Path(second.outputs["completed"]))]
    assert sorted(lines) == list(range(1, 41))


async def test_unpriced_models_are_unknown_not_free(tmp_path: Path, limited):
    summary, _ = await run(tmp_path, "exp", rows(1, model="mystery"), max_queries=600)
    assert summary.answered == 1
    assert summary.cost.unpriced_models == ["mystery"] and summary.cost.by_model["mystery"]["cost"] is None
