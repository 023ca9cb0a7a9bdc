"""Journal, resume index and tables."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from promptfleet.rundir import Journal, RunPaths, find_unfinished, finished_lines, write_state
from promptfleet.tables import write_tables


def test_torn_last_line_is_cut_and_earlier_lines_count(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    lines = [json.dumps({"input_line": n, "response": "r"}) for n in (1, 2, 5)]
    paths.completed.write_text("\n".join(lines) + "\n" + '{"input_line": 9, "resp')
    paths.failed.write_text(json.dumps({"input_line": 3, "error": {}}) + "\n")
    assert finished_lines(paths) == {1, 2, 3, 5}
    assert paths.completed.read_text().endswith("}\n")  # the file is valid JSONL again


def test_journal_appends_whole_lines(tmp_path: Path):
    paths = RunPaths(tmp_path, "s", "exp")
    a, b = Journal(paths), Journal(paths)  # two writers, as with two queues
    for n in range(50):
        (a if n % 2 else b).write("completed", {"input_line": n, "response": "x" * 10_000})
    a.close()
    b.close()
    assert sorted(json.loads(line)["input_line"] for line in paths.completed.read_text().splitlines()) == list(range(50))


def test_unfinished_run_is_found_only_for_the_same_input(tmp_path: Path):
    write_state(RunPaths(tmp_path, "01-01-2026-00-00-00", "exp"), input_sha256="abc", finished=False)
    write_state(RunPaths(tmp_path, "02-01-2026-00-00-00", "exp"), input_sha256="abc", finished=True)
    assert find_unfinished(tmp_path, "exp", "abc") == "01-01-2026-00-00-00"
    assert find_unfinished(tmp_path, "exp", "other") is None


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
