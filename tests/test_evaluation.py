"""Judge files in prompto's format, verdicts, scorers, rephrasing, and the chained study."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from promptfleet import Experiment, Settings
from promptfleet.cli import app
from promptfleet.core.experiment import ExperimentError
from promptfleet.evaluation.judge import (
    parse_verdict,
    post_rephrase_records,
    rephrase_records,
    write_judge_file,
)
from tests.conftest import read_jsonl, write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_api")  # commands report to the session's server

REPO = Path(__file__).resolve().parents[1]
COMPLETED = [
    {"id": 0, "api": "test", "model_name": "m", "prompt": "What is 2+2?", "response": "4", "extra": "x", "input_line": 1},
    {"api": "test", "model_name": "m", "prompt": ["a", "b"], "response": ["r1", "r2"], "input_line": 2},
]


@pytest.fixture
def judge_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps({
        "j1": {"api": "test", "model_name": "judge-model", "parameters": {"temperature": 0.5}},
        "j2": {"api": "openai", "model_name": "gpt-4"},
    }))  # fmt: skip
    (folder / "template.txt").write_text("Input: {INPUT_PROMPT}\nResponse: {OUTPUT_RESPONSE}\nRate it.")
    (folder / "t2.txt").write_text("Is {OUTPUT_RESPONSE} right?")
    (folder / "broken.txt").write_text("Input only: {INPUT_PROMPT}")
    return folder


def test_judge_file_matches_prompto_format(tmp_path: Path, judge_folder: Path):
    completed = write_jsonl(tmp_path / "01-01-2026-00-00-00-completed-exp.jsonl", COMPLETED)
    made = write_judge_file(completed, judge_folder, ["template.txt", "t2.txt"], ["j1", "j2"], tmp_path / "judge-exp.jsonl")
    records = read_jsonl(tmp_path / "judge-exp.jsonl")
    assert made.records == len(records) == 2 * 2 * 2  # judges x templates x answers
    # prompto's documented record, field by field and in order: judge, then template, then answer
    assert records[0] == {
        "id": "judge-j1-template-0",
        "template_name": "template",
        "prompt": "Input: What is 2+2?\nResponse: 4\nRate it.",
        "api": "test",
        "model_name": "judge-model",
        "parameters": {"temperature": 0.5},
        **{f"input-{k}": v for k, v in COMPLETED[0].items()},
    }
    assert list(records[0])[:6] == ["id", "template_name", "prompt", "api", "model_name", "parameters"]
    assert records[1]["id"] == "judge-j1-template-NA"  # no id: prompto's 'NA'
    assert records[1]["prompt"] == "Input: ['a', 'b']\nResponse: ['r1', 'r2']\nRate it."  # as str.format renders lists
    assert [r["id"] for r in records[2:4]] == ["judge-j1-t2-0", "judge-j1-t2-NA"]
    assert records[4]["id"] == "judge-j2-template-0" and "parameters" not in records[4]


def test_bad_judge_setup_is_refused_before_anything_is_written(tmp_path: Path, judge_folder: Path):
    completed = write_jsonl(tmp_path / "c.jsonl", COMPLETED)
    out = tmp_path / "judge.jsonl"
    with pytest.raises(ExperimentError, match=r"broken.txt: template has no \{OUTPUT_RESPONSE\}"):
        write_judge_file(completed, judge_folder, ["broken.txt"], ["j1"], out)
    with pytest.raises(ExperimentError, match="unknown judge 'nobody'"):
        write_judge_file(completed, judge_folder, ["template.txt"], ["nobody"], out)
    assert not out.exists()
    result = CliRunner().invoke(app, ["judge", "-i", str(completed), "-l", str(judge_folder), "-j", "nobody", "-o", str(out)])
    assert result.exit_code == 1 and "unknown judge 'nobody'" in result.output and not out.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Score: 7", {"verdict_score": 7.0}),
        ("rating = 4.5 because", {"verdict_score": 4.5}),
        ("8/10", {"verdict_score": 8.0}),
        ('Here you go: {"score": 3, "reason": "short"}', {"verdict_score": 3, "verdict_reason": "short"}),
        ("Yes.", {"verdict_label": "yes"}),
        ("incorrect", {"verdict_label": "incorrect"}),
        ("I cannot decide, it depends", {"verdict_unparsable": True}),
        ("{not json} maybe", {"verdict_unparsable": True}),
        (None, {"verdict_unparsable": True}),
    ],
)
def test_verdicts_are_parsed_or_flagged(text, expected):
    assert parse_verdict(text) == expected


def my_scorer(record: dict) -> dict:
    return {"length": len(record["response"])}


def broken_scorer(record: dict) -> dict:
    raise RuntimeError("boom")


async def test_scorers_add_keys_and_means(tmp_path: Path):
    rows = [
        {"api": "test", "model_name": "m", "prompt": "p", "parameters": {"reply_with": "Paris"}, "expected_response": "Paris"},
        {"api": "test", "model_name": "m", "prompt": "q", "parameters": {"reply_with": "It is Paris."}, "expected_response": "Paris"},
        {"api": "test", "model_name": "m", "prompt": "r", "parameters": {"reply_with": "Rome"}, "expected_response": "Paris"},
    ]
    settings = Settings(data_folder=tmp_path / "data", scorers=["match", "includes", "tests.test_evaluation:my_scorer", "tests.test_evaluation:broken_scorer"])
    summary = await Experiment(write_jsonl(tmp_path / "exp.jsonl", rows), settings).process()
    done = read_jsonl(Path(summary.outputs["completed"]))
    assert [(r["match"], r["includes"], r["length"]) for r in done] == [(True, True, 5), (False, True, 12), (False, False, 4)]
    assert all("boom" in r["score_errors"]["broken_scorer"] for r in done)
    [model] = summary.models
    assert model["mean_match"] == pytest.approx(1 / 3) and model["mean_includes"] == pytest.approx(2 / 3)


def test_rephrase_records_and_post_rephrase_round_trip(tmp_path: Path):
    original = write_jsonl(tmp_path / "exp.jsonl", [{"id": 1, "api": "openai", "model_name": "gpt", "prompt": "Capital of France?"},
                                                    {"id": 2, "api": "test", "model_name": "m", "prompt": ["multi", "turn"]}])  # fmt: skip
    models = {"r": {"api": "test", "model_name": "rephraser"}}
    made = list(rephrase_records(original, ["Rephrase: {INPUT_PROMPT}", "Vary: {INPUT_PROMPT}"], models))
    assert [(m["id"], m["prompt"]) for m in made] == [("rephrase-r-0-1", "Rephrase: Capital of France?"), ("rephrase-r-1-1", "Vary: Capital of France?")]
    completed = write_jsonl(tmp_path / "c.jsonl", [{**m, "response": ' "What is France\'s capital?" '} for m in made])
    post = list(post_rephrase_records(completed, original))
    assert len(post) == 4 and post[0]["id"] == 1
    assert post[2] == {"id": "rephrased-r-0-1", "api": "openai", "model_name": "gpt", "prompt": "What is France's capital?",
                       "input-prompt": "Capital of France?"}  # fmt: skip
    assert len(list(post_rephrase_records(completed, None))) == 2  # --remove-original


def test_run_with_judge_chains_the_study_offline(tmp_path: Path, prefect_api: str):
    data = tmp_path / "data"
    result = CliRunner().invoke(app, [
        "run", "-f", str(REPO / "data/examples/quickstart.jsonl"), "-d", str(data), "--create-data-folder",
        "--judge-folder", str(REPO / "data/judge"), "--judge", "test-judge,test-yes-no", "--judge-templates", "template.txt,yes-no.txt",
        "--scorer", "match",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "44 prompt(s) (1 failed prompt(s) not judged)" in result.output
    [study] = (data / "output" / "quickstart").glob("*-study-quickstart.parquet")
    table = pl.read_parquet(study)
    assert table.height == 12
    scores = table["verdict_score_test-judge:template"].drop_nulls()
    assert scores.len() == 11 and scores.is_between(1, 10).all()
    assert set(table["verdict_label_test-yes-no:yes-no"].drop_nulls()) == {"yes"}
    failed = table.filter(pl.col("status") == "failed")
    assert failed.height == 1 and failed["verdict_score_test-judge:template"].is_null().all()

    # rewritten on a full disk: the table a reader had stays whole, and no temporary file is left
    from promptfleet.evaluation import study as studies

    before = study.with_suffix(".csv").read_bytes()
    results = next((data / "output" / "quickstart").glob("*-results-quickstart.parquet"))

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a tab")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl.DataFrame, "write_csv", full_disk)
        with pytest.raises(OSError, match="No space"):
            studies.write_study(results, [], [], [], study.with_suffix(""))
    assert study.with_suffix(".csv").read_bytes() == before
    assert sorted(p.name for p in study.parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")) == []


def test_run_with_rephrase_runs_both_experiments(tmp_path: Path, prefect_api: str):
    data = tmp_path / "data"
    path = write_jsonl(tmp_path / "exp.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": f"Question {i}?"} for i in range(3)])
    result = CliRunner().invoke(app, ["run", "-f", str(path), "-d", str(data), "--create-data-folder", "--rephrase-folder", str(REPO / "data/rephrase"),
                                      "--rephrase-model", "test-rephraser", "--remove-original"])  # fmt: skip
    assert result.exit_code == 0, result.output
    [post] = (data / "output" / "post-rephrased-exp").glob("*-completed-*.jsonl")
    records = read_jsonl(post)
    assert len(records) == 3 and {r["prompt"] for r in records} == {"Rephrased: what is the capital?"}
    assert {r["input-prompt"] for r in records} == {f"Question {i}?" for i in range(3)}


def test_a_rephrasing_another_process_has_is_left_to_it_in_one_line(tmp_path: Path, prefect_api: str):
    from promptfleet.core.session import Session

    data = tmp_path / "data"
    path = write_jsonl(tmp_path / "exp.jsonl", [{"id": i, "api": "test", "model_name": "m", "prompt": f"Question {i}?"} for i in range(3)])
    other = Session().lock_for(data / "output" / "rephrase-exp")
    other.acquire()
    try:
        result = CliRunner().invoke(app, ["run", "-f", str(path), "-d", str(data), "--create-data-folder", "--rephrase-folder",
                                          str(REPO / "data/rephrase"), "--rephrase-model", "test-rephraser"])  # fmt: skip
    finally:
        other.release()
    assert result.exit_code == 1, result.output
    assert "exp: the rephrasing is being run by another process; nothing was run here" in result.output
    assert not (data / "output" / "post-rephrased-exp").exists() and not list((data / "output").rglob("*-completed-*"))
