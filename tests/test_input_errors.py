"""Input problems are one line each, `file:line: [field: ]message`, never a traceback:
bytes that are not UTF-8, the BOM Excel writes, CSV rows wider than their header."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.core.experiment import Issue, iter_valid, validated
from promptfleet.providers import known_apis

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

runner = CliRunner()
GOOD = {"api": "test", "model_name": "m", "prompt": "hi"}


def outcomes(path: Path) -> list[tuple[int, dict | Issue]]:
    return list(((i.line, i.value) for i in validated(path, None, known_apis())))


def test_a_byte_that_is_not_utf8_is_reported_with_its_line_and_the_rest_still_reads(tmp_path: Path):
    path = tmp_path / "exp.jsonl"
    latin1 = json.dumps({**GOOD, "prompt": "café"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1 + b"\n" + json.dumps(GOOD).encode() + b"\n")
    found = outcomes(path)
    assert [line for line, _ in found] == [1, 2, 3]
    issue = found[1][1]
    assert isinstance(issue, Issue)
    assert str(issue).startswith(f"{path}:2: not UTF-8 text: byte 0xe9 at column ")
    assert isinstance(found[0][1], dict) and isinstance(found[2][1], dict)


def test_cli_check_names_the_file_and_line_of_a_bad_byte_without_a_traceback(tmp_path: Path):
    path = tmp_path / "exp.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"api": "test", "model_name": "m", "prompt": "\xff"}\n')
    result = runner.invoke(app, ["check", "-f", str(path), "-d", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert f"{path}:2: not UTF-8 text: byte 0xff" in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a UnicodeDecodeError


def test_a_bom_is_accepted_in_jsonl(tmp_path: Path):
    path = tmp_path / "exp.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({**GOOD, "id": "a"}).encode() + b"\n")
    [(line, record)] = outcomes(path)
    assert line == 1 and record["id"] == "a"


def test_an_excel_csv_with_a_bom_and_id_first_keeps_its_ids(tmp_path: Path):
    path = tmp_path / "exp.csv"
    path.write_bytes("\ufeffid,api,model_name,prompt\r\nq1,test,m,hello\r\nq2,test,m,\"two\r\nlines\"\r\n".encode())
    found = outcomes(path)
    assert [(line, r["id"]) for line, r in found] == [(2, "q1"), (3, "q2")]
    assert all("\ufeffid" not in r for _, r in found)
    assert [line for line, _ in iter_valid(path)] == [2, 3]


def test_a_csv_row_with_more_cells_than_headers_is_refused_with_its_line(tmp_path: Path):
    path = tmp_path / "exp.csv"
    path.write_text("api,model_name,prompt\ntest,m,ok\ntest,m,hello, world\ntest,m,fine\n")
    found = outcomes(path)
    assert [line for line, _ in found] == [2, 3, 4]
    issue = found[1][1]
    assert isinstance(issue, Issue)
    assert str(issue) == f"{path}:3: row has 4 cells but the header names 3 columns"


def test_a_csv_byte_that_is_not_utf8_names_its_line(tmp_path: Path):
    path = tmp_path / "exp.csv"
    path.write_bytes(b"api,model_name,prompt\ntest,m,ok\ntest,m,caf\xe9\n")
    found = outcomes(path)
    assert isinstance(found[0][1], dict)
    assert str(found[1][1]).startswith(f"{path}:3: not UTF-8 text: byte 0xe9")


def test_run_refuses_a_bad_csv_row_before_anything_is_sent(tmp_path: Path):
    path = tmp_path / "exp.csv"
    path.write_text("api,model_name,prompt\ntest,m,ok\ntest,m,a,b\n")
    data = tmp_path / "data"
    data.mkdir()
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(data)])
    assert result.exit_code == 1
    assert f"{path}:3: row has 4 cells but the header names 3 columns" in result.output
    assert not (data / "output").exists()
