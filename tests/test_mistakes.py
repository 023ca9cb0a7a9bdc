"""A user's mistakes: one clear line and a non-zero exit, found before anything starts
where possible, a traceback only with --debug."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from tests.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
GOOD = {"api": "test", "model_name": "m", "prompt": "hi"}
PROMPTFLEET = [shutil.which("promptfleet", path=str(Path(sys.executable).parent)) or "promptfleet"]  # the console script: no cwd on sys.path


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_a_data_folder_that_does_not_exist_is_refused_unless_asked_to_create_it(tmp_path: Path):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD])
    for command in (["run", "-f", str(path)], ["pipeline", "--once"]):
        result = runner.invoke(app, [*command, "-d", str(tmp_path / "dta")])
        assert result.exit_code == 1
        assert one_line(result.output) == f"{tmp_path / 'dta'}: data folder not found (check -d, or add --create-data-folder to create it)"
    assert not (tmp_path / "dta").exists()
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(tmp_path / "file")])
    assert result.exit_code == 1 and one_line(result.output).endswith("the data folder is a file, not a folder")


def test_a_scorer_that_cannot_be_imported_is_refused_before_anything_starts(tmp_path: Path):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD])
    (tmp_path / "data").mkdir()
    for scorer, expected in [
        ("myscores:exact_year", "cannot import module 'myscores': a module in the current folder needs PYTHONPATH=."),
        ("json:no_such_function", "module 'json' has no function 'no_such_function'"),
        ("nonsense", "unknown scorer 'nonsense'"),
    ]:
        result = runner.invoke(app, ["run", "-f", str(path), "-d", str(tmp_path / "data"), "--scorer", scorer])
        assert result.exit_code == 1
        assert one_line(result.output).startswith(f"--scorer {scorer}: {expected}")
    assert not (tmp_path / "data" / "input").exists()


def test_the_readme_scorer_example_runs_with_pythonpath(tmp_path: Path, prefect_api: str):
    """A scorer module next to the data works with `PYTHONPATH=.`, as the README says."""
    (tmp_path / "myscores.py").write_text("def exact_year(record):\n    return {'exact_year': '1969' in record.get('response', '')}\n")
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD])
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    args = ["run", "-f", str(path), "--scorer", "myscores:exact_year"]
    without = subprocess.run(PROMPTFLEET + args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert without.returncode == 1 and "PYTHONPATH=." in one_line(without.stderr)
    ran = subprocess.run(PROMPTFLEET + args, env={**env, "PYTHONPATH": "."}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert '"exact_year": false' in next((tmp_path / "data" / "output" / "exp").glob("*-completed-exp.jsonl")).read_text()


def test_a_missing_api_key_is_one_line_and_a_secret_block_counts_as_set(tmp_path: Path, prefect_api: str, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    path = write_jsonl(tmp_path / "exp.jsonl", [{"api": "anthropic", "model_name": "claude-x", "prompt": "hi"}])
    data = tmp_path / "data"
    data.mkdir()
    none = str(tmp_path / "none.env")
    result = runner.invoke(app, ["run", "-f", str(path), "-d", str(data), "-e", none])
    assert result.exit_code == 1
    assert one_line(result.output) == (
        f"{path}: env: anthropic/claude-x needs ANTHROPIC_API_KEY (not set in the environment, the .env file or a Prefect Secret block)"
    )
    assert not (data / "input").exists()  # nothing started, nothing copied

    Secret(value="sk-ant-from-a-block-000000").save("anthropic-api-key", overwrite=True)
    try:
        checked = runner.invoke(app, ["check", "-f", str(path), "-d", str(data), "-e", none])
        assert checked.exit_code == 0, checked.output
        assert "sk-ant-from-a-block" not in checked.output and "needs" not in checked.output
    finally:
        asyncio.run(_delete_block("anthropic-api-key"))


def test_run_sends_with_a_key_from_a_secret_block(tmp_path: Path, prefect_api: str, fake_openai, monkeypatch):
    """`run` counts a Secret block as set, as `check` does, and the run goes on to send with
    the block's value (the plan the CLI made before reading the blocks must not refuse it)."""
    from prefect.blocks.system import Secret

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    path = write_jsonl(tmp_path / "exp.jsonl", [{"api": "openai", "model_name": "gpt-x", "prompt": "hi"}])
    data = tmp_path / "data"
    data.mkdir()
    Secret(value="sk-from-a-block-0123456789").save("openai-api-key", overwrite=True)
    try:
        result = runner.invoke(app, ["run", "-f", str(path), "-d", str(data), "-e", str(tmp_path / "none.env")])
    finally:
        os.environ.pop("OPENAI_API_KEY", None)  # the run set it in this process from the block
        asyncio.run(_delete_block("openai-api-key"))
    assert result.exit_code == 0, result.output
    assert fake_openai.state.auth_headers == ["Bearer sk-from-a-block-0123456789"]


async def _delete_block(name: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        document = await client.read_block_document_by_name(name, "secret")
        await client.delete_block_document(document.id)


def test_judge_output_that_cannot_be_written_is_one_line(tmp_path: Path):
    from promptfleet.evaluation.judge import judge_file_name

    completed = write_jsonl(tmp_path / "24-11-2026-18-12-22-completed-exp.jsonl", [{**GOOD, "id": 1, "response": "yes"}])
    judge = ["judge", "-i", str(completed), "-l", str(REPO / "data/judge"), "-j", "test-judge"]
    folder = tmp_path / "out folder"
    (folder / judge_file_name(completed)).mkdir(parents=True)  # the judge file's name is taken by a folder
    result = runner.invoke(app, [*judge, "-o", str(folder)])
    assert result.exit_code == 1
    assert one_line(result.output).startswith(f"{folder / judge_file_name(completed)}: cannot write the judge file there (")
    (tmp_path / "a file").write_text("")
    result = runner.invoke(app, [*judge, "-o", str(tmp_path / "a file")])
    assert result.exit_code == 1 and one_line(result.output) == f"{tmp_path / 'a file'}: --output-folder is a file, not a folder"
    missing = runner.invoke(app, ["judge", "-i", str(tmp_path / "nope.jsonl"), "-l", str(REPO / "data/judge"), "-j", "test-judge"])
    assert missing.exit_code == 1 and one_line(missing.output) == f"{tmp_path / 'nope.jsonl'}: file not found"


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_is_one_line_and_its_traceback_needs_debug(tmp_path: Path, debug: bool):
    path = write_jsonl(tmp_path / "exp.jsonl", [GOOD])
    (tmp_path / "data").mkdir()
    args = ["run", "-f", str(path), "-mqj", str(tmp_path)] + (["--debug"] if debug else [])  # limits "file" is a folder
    done = subprocess.run(PROMPTFLEET + args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    if debug:
        assert "Traceback" in done.stderr or "IsADirectoryError" in done.stderr.splitlines()[-1]
    else:
        assert one_line(done.stderr) == (
            f"error: IsADirectoryError: [Errno 21] Is a directory: '{tmp_path}' (run again with --debug for the traceback)"
        )


def test_a_bad_file_in_the_pipeline_is_one_line_with_the_report_in_rejected(tmp_path: Path, prefect_api: str, caplog):
    data = tmp_path / "data"
    write_jsonl(data / "input" / "bad.jsonl", [GOOD, {"api": "nope", "model_name": "m", "prompt": "x"}, {"api": "test"}])
    with caplog.at_level("INFO"):
        result = runner.invoke(app, ["pipeline", "-d", str(data), "--once", "--settle", "0"])
    assert result.exit_code == 0, result.output
    about_it = [r for r in caplog.records if "bad.jsonl" in r.getMessage() and r.name.startswith("promptfleet")]
    [line] = [r.getMessage() for r in about_it]
    assert "\n" not in line, line
    assert line.startswith("bad.jsonl cannot run (2 problem(s), first: ") and line.endswith("with the full report")
    assert not [r for r in caplog.records if r.exc_info and r.exc_info[0]]  # no traceback anywhere
    [report] = (data / "rejected").glob("*-bad.jsonl.errors.txt")
    assert report.read_text().count("bad.jsonl:") == 2  # the full report: every problem with its line
