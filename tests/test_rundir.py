"""Journal, resume index and tables."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from promptfleet.core.rundir import (
    Journal,
    RunPaths,
    read_journal,
    unfinished_runs,
    write_state,
)
from promptfleet.core.tables import write_tables


def test_torn_lines_anywhere_are_set_aside_and_the_rest_count(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    lines = [json.dumps({"input_line": n, "input_key": f"k{n}", "response": "r"}) for n in (1, 2, 5)]
    torn = '{"input_line": 9, "resp'
    paths.completed.write_text(lines[0] + "\n" + torn + lines[1] + "\n" + lines[2] + "\n" + torn)
    paths.failed.write_text(json.dumps({"input_line": 3, "input_key": "k3", "error": {}}) + "\n")
    done = read_journal(paths)
    assert sorted(done.keys) == ["k1", "k3", "k5"] and done.corrupt == 2  # k2 was glued to a torn record
    assert [json.loads(line)["input_line"] for line in paths.completed.read_text().splitlines()] == [1, 5]  # valid JSONL again
    assert Path(str(paths.completed) + ".corrupt").read_text().count("\n") == 2


def test_journal_appends_whole_lines(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    a, b = Journal(paths), Journal(paths)  # two writers, as with two queues
    for n in range(50):
        (a if n % 2 else b).write("completed", {"input_line": n, "response": "x" * 10_000})
    a.close()
    b.close()
    assert sorted(json.loads(line)["input_line"] for line in paths.completed.read_text().splitlines()) == list(range(50))


def test_unfinished_runs_newest_first_by_start_not_by_name(tmp_path: Path):
    write_state(RunPaths(tmp_path, "30-11-2026-00-00-00", "exp"), input_sha256="abc", finished=False, started="2026-11-30T00:00:00")
    write_state(RunPaths(tmp_path, "01-12-2026-00-00-00", "exp"), input_sha256="abc", finished=False, started="2026-12-01T00:00:00")
    write_state(RunPaths(tmp_path, "02-12-2026-00-00-00", "exp"), input_sha256="abc", finished=True, started="2026-12-02T00:00:00")
    assert [stamp for stamp, _ in unfinished_runs(tmp_path, "exp")] == ["01-12-2026-00-00-00", "30-11-2026-00-00-00"]


def test_tables_hold_every_prompt_with_status(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    journal = Journal(paths)
    journal.write("completed", {"input_line": 2, "id": 7, "api": "test", "model_name": "m", "prompt": ["a", "b"],
                                "response": ["x", "y"], "latency_s": 0.5, "attempts": 1,
                                "usage": {"input_tokens": 3, "output_tokens": 4}})  # fmt: skip
    journal.write("failed", {"input_line": 1, "api": "test", "model_name": "m", "prompt": "p",
                             "error": {"type": "bad_request", "status": 400, "message": "no", "attempts": 1}})  # fmt: skip
    journal.close()
    summary = write_tables(paths, csv=True)
    table = pl.read_parquet(paths.parquet).sort("input_line")
    assert table["input_line"].to_list() == [1, 2]
    assert table["status"].to_list() == ["failed", "completed"]
    assert table["prompt"].to_list() == ["p", '["a", "b"]']
    assert table["error_status"].to_list() == [400, None]
    assert pl.read_csv(paths.csv).height == 2
    assert summary.to_dicts()[0] | {} == {**summary.to_dicts()[0], "prompts": 2, "answered": 1, "failed": 1, "input_tokens": 3}


def test_per_model_summary_is_added_up_while_the_table_is_written(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    journal = Journal(paths)
    for i, latency in enumerate([0.3, 0.1, 0.2, 0.4]):
        journal.write("completed", {"input_line": i, "api": "test", "model_name": "a", "prompt": "p", "response": "r", "latency_s": latency,
                                    "usage": {"input_tokens": 2, "output_tokens": None}, "exact": i % 2 == 0})  # fmt: skip
    journal.write("failed", {"input_line": 9, "api": "test", "model_name": "b", "prompt": "p", "error": {"type": "auth", "attempts": 1}})
    journal.close()
    summary = write_tables(paths, score_keys=["exact"], batch=3)  # more than one part
    a, b = summary.to_dicts()
    assert a == {"api": "test", "model_name": "a", "prompts": 4, "answered": 4, "failed": 0, "latency_p50_s": 0.3, "latency_p95_s": 0.4,
                 "input_tokens": 8, "output_tokens": 0, "mean_exact": 0.5, "model_versions": [], "system_fingerprints": [], "seeds": []}  # fmt: skip
    assert (b["model_name"], b["failed"], b["latency_p50_s"], b["mean_exact"]) == ("b", 1, None, None)
    assert pl.read_parquet(paths.parquet).height == 5


def test_the_keys_read_without_parsing_are_those_parsing_finds_and_a_record_cut_anywhere_is_set_aside(tmp_path: Path):
    """Records as the engine journals them (the key last) are read by their end; a record cut
    at any byte and ended by the next write's newline is parsed, found torn and set aside."""
    def record(n: int, **more) -> dict:
        return {"id": n, "prompt": f"q{n} é", "response": '"}\n'.strip(), "usage": {"input_tokens": 2}, **more,
                "input_line": n, "input_key": f"{n:024x}"}  # fmt: skip

    paths = RunPaths(tmp_path, "s", "exp")
    journal = Journal(paths)
    for n in (1, 2):
        journal.write("completed", record(n))
    journal.write("completed", {**record(3), "score": 1.0})  # a scorer's column after the key: parsed
    journal.close()
    whole = paths.completed.read_bytes()
    cut_from = json.dumps(record(4), ensure_ascii=False).encode()
    for cut in range(1, len(cut_from)):
        paths.completed.write_bytes(whole + cut_from[:cut] + b"\n" + whole)
        done = read_journal(paths)
        assert done.keys == {f"{n:024x}": 2 for n in (1, 2, 3)} and done.corrupt == 1, cut
    paths.completed.write_bytes(whole + cut_from + b"\n")
    assert read_journal(paths).keys == {f"{n:024x}": 1 for n in (1, 2, 3, 4)}
