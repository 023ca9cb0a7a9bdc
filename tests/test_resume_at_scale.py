"""What makes a million-prompt run resume in seconds and end in seconds: the plan kept next to
its outputs, the result table written while the run goes and in input order, and a resumed
run's summary counting the whole run."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import polars as pl
import pytest

from promptfleet import Experiment, Session, Settings
from promptfleet.core import plan_cache
from promptfleet.core.plan import inspect
from promptfleet.core.rundir import Journal, RunPaths
from promptfleet.core.tables import TableWriter, write_tables
from tests.conftest import write_jsonl


def _rows(n: int, **extra) -> list[dict]:
    return [{"id": i, "api": "test", "model_name": "test-m", "prompt": f"question {i}", **extra} for i in range(n)]


def test_a_kept_plan_is_reused_for_the_same_bytes_and_settings_only(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(plan_cache, "CACHE_FROM_PROMPTS", 10)
    planned: list[Path] = []
    monkeypatch.setattr(plan_cache, "inspect", lambda file, settings: planned.append(file) or inspect(file, settings))
    file = write_jsonl(tmp_path / "big.jsonl", _rows(50) + [{"api": "openai", "model_name": "gpt-4o-mini", "prompt": "x"}])
    settings = Settings(data_folder=tmp_path / "data", max_queries=600, parallel=True)
    (settings.output_folder / "big").mkdir(parents=True)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-present")
    first = plan_cache.plan_for(file, settings)
    plan_cache.keep(first, settings)
    assert len(planned) == 1

    monkeypatch.delenv("OPENAI_API_KEY")
    again = plan_cache.plan_for(file, settings)
    assert len(planned) == 1  # read back, not planned again
    for queue in first.queues:
        a, b = first.queues[queue], again.queues[queue]
        assert (a.lines, a.offsets, a.lengths, a.keys, a.rate_per_minute, a.target) == (b.lines, b.offsets, b.lengths, b.keys, b.rate_per_minute, b.target)
    assert (again.digest, again.prompts, again.worst_case_cost) == (first.digest, first.prompts, first.worst_case_cost)
    assert again.missing_env == {"openai/gpt-4o-mini": ["OPENAI_API_KEY"]}  # the environment is asked again

    plan_cache.plan_for(file, Settings(data_folder=tmp_path / "data", max_queries=60, parallel=True))  # other settings
    with file.open("a") as fh:  # other bytes
        fh.write(json.dumps(_rows(1)[0]) + "\n")
    grown = plan_cache.plan_for(file, settings)
    assert len(planned) == 3 and grown.prompts == 52
    cache = settings.output_folder / "big" / ".plan"
    plan_cache.keep(grown, settings)
    cache.write_bytes(cache.read_bytes()[:-7])  # torn by a full disk
    assert plan_cache.plan_for(file, settings).prompts == 52 and len(planned) == 4
    plan_cache.forget(file, settings)
    assert not cache.exists()


def test_the_table_is_in_input_order_whatever_order_answers_landed(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    lines = [1, 2, 3, 60_001, 60_002, 120_000, 7, 8]  # three buckets of input lines
    landed = random.Random(4).sample(lines, len(lines)) + [2]  # line 2 answered twice (an edited input's stale answer)
    journal = Journal(paths)
    for n, line in enumerate(landed):
        kind = "failed" if line == 8 else "completed"
        journal.write(kind, {"input_line": line, "api": "test", "model_name": "m", "prompt": f"p{line}", "response": f"r{n}",
                             **({"error": {"type": "bad_request", "status": 400, "message": "no", "attempts": 1}} if kind == "failed" else {})})  # fmt: skip
    journal.close()
    write_tables(paths, csv=True, batch=2)  # parts of two rows: every bucket in several
    table = pl.read_parquet(paths.parquet)
    assert table["input_line"].to_list() == sorted(landed)
    twice = table.filter(pl.col("input_line") == 2)["response"].to_list()
    assert twice == [f"r{n}" for n, line in enumerate(landed) if line == 2]  # as they landed
    assert pl.read_csv(paths.csv)["input_line"].to_list() == sorted(landed)
    assert not list(tmp_path.glob(".s-table-*"))  # no parts left behind


def test_the_table_follows_the_journal_while_the_run_goes(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    journal = Journal(paths)
    for line in (5, 3, 4):  # an earlier session's answers
        journal.write("completed", {"input_line": line, "api": "test", "model_name": "m", "prompt": "p", "usage": {"input_tokens": line}})
    earlier = paths.completed.stat().st_size
    handed: list[int] = []
    writer = TableWriter(paths, batch=2, on_answer=lambda record: handed.append(record["input_line"]), answers_before=earlier)
    writer.follow(after=0, every=0.01)
    deadline = time.monotonic() + 10
    while len(handed) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(handed) == [3, 4, 5]  # read while the run goes, before it ends
    for line in (2, 1):  # this session's
        journal.write("completed", {"input_line": line, "api": "test", "model_name": "m", "prompt": "p", "usage": {"input_tokens": line}})
    journal.write("failed", {"input_line": 6, "api": "test", "model_name": "m", "prompt": "p", "error": {"type": "auth", "attempts": 1}})
    journal.close()
    summary = writer.finish()
    assert pl.read_parquet(paths.parquet)["input_line"].to_list() == [1, 2, 3, 4, 5, 6]
    assert sorted(handed) == [3, 4, 5]  # only the earlier sessions' answers: this session counted its own
    assert summary.to_dicts()[0]["prompts"] == 6 and summary.to_dicts()[0]["input_tokens"] == 15


async def test_a_resumed_run_counts_the_whole_run_in_its_summary(tmp_path: Path):
    path = write_jsonl(tmp_path / "exp.jsonl", _rows(300, parameters={"latency": 0.01}))
    settings = Settings(data_folder=tmp_path / "data", max_queries=60_000)
    session = Session()

    async def stop_half_way() -> None:
        while session.runs and sum(s.answered for s in session.runs[0].stats.values()) < 100 or not session.runs:
            await asyncio.sleep(0.005)
        session.request_stop()

    stopper = asyncio.create_task(stop_half_way())
    first = await Experiment(path, settings, session=session).process()
    await stopper
    assert not first.complete and 0 < first.answered < 300
    copied = Path(first.outputs["input"]).stat()
    second = await Experiment(path, settings).process()
    again = Path(second.outputs["input"]).stat()
    assert (again.st_ino, again.st_mtime_ns) == (copied.st_ino, copied.st_mtime_ns)  # the same bytes are not copied again
    table = pl.read_parquet(second.outputs["parquet"])
    assert second.resumed and second.complete and table["input_line"].to_list() == list(range(1, 301))
    [model] = second.models
    assert second.cost.input_tokens == model["input_tokens"] == table["input_tokens"].sum()
    assert second.cost.output_tokens == model["output_tokens"] == table["output_tokens"].sum()
    assert second.cost.by_model["test-m"]["input_tokens"] == second.cost.input_tokens


@pytest.mark.parametrize("answered", [(1, 3), (1, 2)])  # the repeated line answered once, or twice
async def test_a_line_repeated_in_the_input_is_answered_once_per_time_it_appears(tmp_path: Path, answered: tuple[int, int]):
    same = {"api": "test", "model_name": "test-m", "prompt": "the same question"}
    path = write_jsonl(tmp_path / "exp.jsonl", [same, same, {**same, "prompt": "another"}, same])
    settings = Settings(data_folder=tmp_path / "data")
    first = await Experiment(path, settings).process()
    completed = Path(first.outputs["completed"])
    lines = completed.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["input_line"] in answered]  # as if killed after two answers
    completed.write_text("".join(line + "\n" for line in kept))
    state = next(completed.parent.glob("*-run-exp.json"))
    state.write_text(json.dumps({**json.loads(state.read_text()), "finished": False}))
    second = await Experiment(path, settings).process()
    assert second.resumed and second.complete
    assert sorted(json.loads(line)["input_line"] for line in completed.read_text().splitlines()) == [1, 2, 3, 4]
