"""One claim for every entry point: an inbox file run on demand leaves the inbox as a poll
would take it, a second taker does nothing and says so, and each completed run is judged
once per judge setting, whoever asks — counted at a local fake OpenAI API."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptfleet import Settings
from promptfleet.cli import app
from promptfleet.core import inbox
from promptfleet.core.session import Session
from promptfleet.evaluation.judged import take_judging
from tests.conftest import read_jsonl, write_jsonl
from tests.fakes import FakeServer

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

REPO = Path(__file__).resolve().parents[1]


def _experiment(path: Path, n: int = 3, tag: str = "q") -> Path:
    return write_jsonl(path, [{"id": i, "prompt": f"{tag} {i}", "api": "openai", "model_name": "gpt-fake"} for i in range(n)])


def _openai_judge(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "template.txt").write_text("Rate: {INPUT_PROMPT} -> {OUTPUT_RESPONSE}\n")
    (folder / "settings.json").write_text(json.dumps({"j": {"api": "openai", "model_name": "judge-fake"}}))
    return folder


def test_take_claims_an_inbox_file_once_and_knows_when_it_was_run(tmp_path: Path):
    settings = Settings(data_folder=tmp_path / "data")
    path = _experiment(settings.input_folder / "exp.jsonl")
    first, second = Session(), Session()
    work = inbox.take(path, settings, first)
    assert work.claim is not None and work.file.parent.name == ".running" and not path.exists()
    assert inbox.take(work.file, settings, first).file == work.file  # the same session: the same work
    with pytest.raises(inbox.Taken, match="claimed by pid") as taken:
        inbox.take(path, settings, second)
    assert taken.value.running
    work.claim.end()
    first.lock_for(settings.output_folder / "exp").release()
    # a finished run of the file: a late on-demand request is told where its outputs are
    out = settings.output_folder / "exp"
    out.mkdir(parents=True, exist_ok=True)
    (out / "01-01-2026-00-00-00-run-exp.json").write_text(json.dumps({"finished": True, "source": str(work.file), "ended": "x"}))
    work.file.unlink()
    with pytest.raises(inbox.Taken, match="was run already .*01-01-2026-00-00-00-completed-exp.jsonl"):
        inbox.take(path, settings, Session())


def test_a_run_on_demand_of_an_inbox_file_leaves_the_inbox_and_a_second_does_nothing(tmp_path: Path, prefect_api: str, openai_env: FakeServer):
    from promptfleet.orchestration.flows.run_experiment import run_experiment

    settings = Settings(data_folder=tmp_path / "data", max_queries=600)
    path = _experiment(settings.input_folder / "exp.jsonl")
    summary = asyncio.run(run_experiment(file=str(path), settings=settings))
    assert summary.complete and summary.answered == 3
    assert not path.exists() and not list(settings.input_folder.glob("*.jsonl"))  # taken out, as a poll takes it
    state = asyncio.run(run_experiment(file=str(path), settings=settings, return_state=True))
    assert state.is_completed() and "run already" in state.message  # one line, no failure, nothing sent
    assert set(openai_env.state.answered.values()) == {1} and len(openai_env.state.answered) == 3


def test_a_judging_is_claimed_once_even_by_racing_requests(tmp_path: Path):
    completed = write_jsonl(tmp_path / "out" / "01-01-2026-00-00-00-completed-exp.jsonl",
                            [{"id": 1, "prompt": "p", "response": "r", "input_line": 1}])  # fmt: skip
    folder = _openai_judge(tmp_path / "judge")
    won, lost = [], []

    def ask() -> None:
        try:
            won.append(take_judging(completed, folder, ["j"], ["template.txt"]))
        except inbox.Taken as taken:
            lost.append(taken)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(lost) == 5 and all("being judged" in str(t) for t in lost)
    [claim] = won
    assert claim.name.startswith("judge-exp-") and claim.file.parent == completed.parent
    from promptfleet.core.rundir import RunPaths

    claim.done(RunPaths(tmp_path / "j", "s", claim.name), ["j"], ["template"])
    with pytest.raises(inbox.Taken, match="judged with this setting already"):
        take_judging(completed, folder, ["j"], ["template.txt"])
    (folder / "template.txt").write_text("Grade: {OUTPUT_RESPONSE}\n")  # another setting: judged again
    take_judging(completed, folder, ["j"], ["template.txt"]).end()


def test_judge_what_exists_once_per_setting(tmp_path: Path, prefect_api: str, openai_env: FakeServer):
    data = tmp_path / "data"
    exp = _experiment(tmp_path / "exp.jsonl")
    folder = _openai_judge(tmp_path / "judge")
    judge = ["--judge-folder", str(folder), "--judge", "j"]
    first = CliRunner().invoke(app, ["run", "-f", str(exp), "-d", str(data), "--create-data-folder", "-mq", "600", *judge])
    assert first.exit_code == 0, first.output
    assert sum(openai_env.state.answered.values()) == 6  # 3 prompts, 3 judge prompts
    # the same experiment again with --judge: complete already with this input, judged already: nothing sent
    again = CliRunner().invoke(app, ["run", "-f", str(exp), "-d", str(data), "-mq", "600", *judge])
    assert again.exit_code == 0, again.output
    assert "complete already" in again.output and sum(openai_env.state.answered.values()) == 6
    [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
    judged = CliRunner().invoke(app, ["judge", "--run", str(completed), *judge, "-d", str(data), "-mq", "600"])
    assert judged.exit_code == 0 and sum(openai_env.state.answered.values()) == 6, judged.output
    # another template: judged, and the study table holds both settings' verdicts
    (folder / "strict.txt").write_text("Strictly: {OUTPUT_RESPONSE}\n")
    strict = CliRunner().invoke(app, ["judge", "--run", str(completed), *judge, "-t", "strict.txt", "-d", str(data), "-mq", "600"])
    assert strict.exit_code == 0, strict.output
    assert sum(openai_env.state.answered.values()) == 9 and set(openai_env.state.answered.values()) == {1}
    import polars as pl

    [study] = (data / "output" / "exp").glob("*-study-exp.parquet")
    columns = pl.read_parquet(study).columns
    assert "verdict_text_j:template" in columns and "verdict_text_j:strict" in columns
    # the template edited under the same name: a new setting, judged; its verdicts replace the old ones
    (folder / "template.txt").write_text("Edited: {OUTPUT_RESPONSE}\n")
    edited = CliRunner().invoke(app, ["judge", "--run", str(completed), *judge, "-d", str(data), "-mq", "600"])
    assert edited.exit_code == 0 and sum(openai_env.state.answered.values()) == 12, edited.output
    table = pl.read_parquet(study)
    assert table.height == 3 and table["verdict_text_j:template"].drop_nulls().len() == 3
    assert len(read_jsonl(completed)) == 3


def test_promptfleet_run_of_an_inbox_file_takes_it_out_of_the_inbox_and_answers_it(tmp_path: Path):
    """The command, as a user types it on a file waiting in data/input/: claimed as a poll
    would claim it, run to the end, and no claim or owner record left behind."""
    data = tmp_path / "data"
    path = write_jsonl(data / "input" / "exp.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": f"p{i}"} for i in range(3)])
    result = CliRunner().invoke(app, ["run", "-f", str(path), "-d", str(data)])
    assert result.exit_code == 0, result.output
    assert not path.exists() and not list((data / "input").rglob("*exp.jsonl*"))
    [completed] = (data / "output" / "exp").glob("*-completed-exp.jsonl")
    assert sorted(r["id"] for r in read_jsonl(completed)) == [0, 1, 2]


def test_the_python_api_claims_an_inbox_file_as_a_poll_would(tmp_path: Path, openai_env: FakeServer):
    from promptfleet import Experiment, Taken

    settings = Settings(data_folder=tmp_path / "data", max_queries=600)
    path = _experiment(settings.input_folder / "exp.jsonl")
    poll = Session()  # a service watching the folder has the file
    work = inbox.take(path, settings, poll)
    for name in ("exp.jsonl", path):  # looked up in the inbox, or named there
        with pytest.raises(Taken, match="(claimed|being run) by pid"):
            asyncio.run(Experiment(name, settings).process())
    assert openai_env.state.answered == {}
    inbox.release(work.claim)
    poll.lock_for(settings.output_folder / "exp").release()
    summary = asyncio.run(Experiment("exp.jsonl", settings).process())
    assert summary.complete and summary.answered == 3 and not path.exists()
    with pytest.raises(Taken, match="run already"):  # a poll would now be told the same
        inbox.take(path, settings, Session())
    bad = write_jsonl(settings.input_folder / "bad.jsonl", [{"prompt": "no api"}])
    with pytest.raises(Exception, match="api"):
        asyncio.run(Experiment(bad, settings).process())
    assert bad.exists() and not list(inbox.running_folder(settings.input_folder).glob("bad*"))  # back where it was
    assert set(openai_env.state.answered.values()) == {1} and len(openai_env.state.answered) == 3
