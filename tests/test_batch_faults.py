"""Batch mode pays once, and only for our own prompts (issue 30): through the official SDKs
against the local batch fake, the faults of a batch's life — creates whose answer is lost,
another experiment's batch of the same size, status reads and downloads that fail, uploads
that fail — and kill -9 at every step of a submission. Each ends with every prompt answered
with its own answer and paid (answered at the fake) exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from promptfleet.batch import jobs
from promptfleet.batch.journal import BatchJournal
from tests.conftest import write_jsonl
from tests.fake_batches import FakeBatchServer
from tests.test_batch import outputs, run_once, settings

ROOT = Path(__file__).resolve().parents[1]


def rows(prefix: str, n: int, api: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "api": api, "model_name": "claude-3-5-haiku" if api == "anthropic" else
             {"openai": "gpt-4o-mini", "gemini": "gemini-2.0-flash"}[api], "prompt": f"{prefix}{i}"} for i in range(n)]  # fmt: skip


def own_answers(data: Path, name: str) -> dict[str, str]:
    completed, _ = outputs(data, name)
    assert all(r["response"] == f"answer to: {r['id']}" for r in completed)  # each prompt's own answer, under its own id
    return {r["id"]: r["response"] for r in completed}


def ledger(data: Path, name: str = "exp"):
    return BatchJournal(next((data / "output" / name).glob(f"*-batches-{name}.jsonl"))).load()


@pytest.mark.parametrize("lost", ["before", "after"])
def test_x_never_adopts_y_pending_batch_of_the_same_size_when_its_creates_answer_502(tmp_path: Path, fake: FakeBatchServer, lost: str):
    """Y is pending on the same key with as many prompts; X's create answers 502 three times
    (`before`: nothing was made) or once after making X's batch (`after`: the answer was lost)."""
    data = tmp_path / "data"
    y = write_jsonl(tmp_path / "y.jsonl", rows("y", 5, "anthropic"))
    run_once(y, settings(data, batch_detach=True))
    [y_job] = fake.state.jobs.values()
    y_job.held = True
    if lost == "before":
        fake.state.faults["anthropic:create"] = [502, 502, 502]
    else:
        fake.state.faults_after["anthropic:create"] = [502]
    x = write_jsonl(tmp_path / "x.jsonl", rows("x", 5, "anthropic"))
    summary = run_once(x, settings(data))
    assert summary["complete"] and summary["answered"] == 5
    assert own_answers(data, "x") == {f"x{i}": f"answer to: x{i}" for i in range(5)}
    assert all(fake.state.submissions[f"x{i}"] == 1 and fake.state.answered[f"x{i}"] == 1 for i in range(5))  # each X prompt paid once
    assert fake.state.creates["anthropic"] == 2 and fake.state.calls["anthropic:create"] == (1 + 4 if lost == "before" else 1 + 1)  # Y, then X
    assert y_job.state == "running" and not any(fake.state.answered[f"y{i}"] for i in range(5))  # Y's batch untouched, still Y's
    assert [b.batch_id for b in ledger(data, "x").batches()] != [y_job.id]


def test_a_gemini_batch_whose_status_reads_fail_404_then_500_is_read_again_never_resubmitted(tmp_path: Path, fake: FakeBatchServer):
    fake.state.faults["gemini:status"] = [404, 404, 500, 500, 500]
    path = write_jsonl(tmp_path / "exp.jsonl", rows("g", 6, "gemini"))
    summary = run_once(path, settings(tmp_path / "data", max_attempts=2))
    assert summary["complete"] and summary["answered"] == 6 and summary["failed"] == 0
    assert fake.state.creates["gemini"] == 1 and fake.state.answered == Counter({f"g{i}": 1 for i in range(6)})
    assert len(own_answers(tmp_path / "data", "exp")) == 6
    assert fake.state.calls["gemini:status"] > 5  # read through the faults, not around them


def test_openai_results_whose_download_answers_500_are_read_again_and_cost_no_attempt(tmp_path: Path, fake: FakeBatchServer):
    fake.state.faults["openai:download"] = [500, 500, 500]  # more failures than -ma
    path = write_jsonl(tmp_path / "exp.jsonl", rows("o", 6, "openai"))
    summary = run_once(path, settings(tmp_path / "data", max_attempts=2))
    assert summary["complete"] and summary["answered"] == 6
    assert fake.state.creates["openai"] == 1 and fake.state.submissions == Counter({f"o{i}": 1 for i in range(6)})
    completed, _ = outputs(tmp_path / "data")
    assert {r["attempts"] for r in completed} == {1} and len(own_answers(tmp_path / "data", "exp")) == 6


def test_uploads_retry_a_few_times_and_copies_that_landed_are_deleted(tmp_path: Path, fake: FakeBatchServer):
    fake.state.faults_after["openai:upload"] = [500, 503]  # stored, but the answer was lost: two stray copies
    path = write_jsonl(tmp_path / "exp.jsonl", rows("u", 3, "openai"))
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["answered"] == 3 and fake.state.calls["openai:upload"] == 3
    [job] = fake.state.jobs.values()
    assert len(fake.state.deleted) == 2 and fake.state.creates["openai"] == 1
    [row] = summary["batches"]
    assert row["batch"] == job.id and len(row["files"]) == 3 and sorted(row["deleted_files"]) == sorted(fake.state.deleted)
    assert list(fake.state.live_files) == [f for f in row["files"] if f not in row["deleted_files"]]  # the batch's own file stays
    manifest = next((tmp_path / "data" / "output" / "exp").glob("*-manifest-exp.json")).read_text()
    assert all(f in manifest for f in fake.state.files)  # every file created is in the manifest


def test_an_upload_that_keeps_failing_stops_the_run_and_leaves_no_file(tmp_path: Path, fake: FakeBatchServer):
    fake.state.faults_after["openai:upload"] = [500] * 100  # each try stores a file and answers 500
    path = write_jsonl(tmp_path / "exp.jsonl", rows("u", 3, "openai"))
    summary = run_once(path, settings(tmp_path / "data"))
    assert not summary["complete"] and "uploading the requests for 3 prompt(s) failed 6 times" in summary["stopped_by"]
    assert fake.state.calls["openai:upload"] == 6 and fake.state.creates["openai"] == 0  # capped: 6 tries, not 120
    assert not fake.state.live_files and len(fake.state.deleted) == 6  # deleted at the end of the run
    fake.state.faults_after.clear()
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["answered"] == 3 and fake.state.creates["openai"] == 1 and len(fake.state.live_files) == 1


@pytest.mark.parametrize("made", [False, True])
def test_an_unanswered_create_the_provider_cannot_be_asked_about_stops_the_run_then_resumes_once(tmp_path: Path, fake: FakeBatchServer,
                                                                                                  made: bool):  # fmt: skip
    (fake.state.faults_after if made else fake.state.faults)["openai:create"] = [502]
    fake.state.faults["openai:list"] = [503] * 6
    path = write_jsonl(tmp_path / "exp.jsonl", rows("c", 3, "openai"))
    summary = run_once(path, settings(tmp_path / "data"))
    assert not summary["complete"] and summary["live_batches"] == 1
    assert "cannot be asked whether it made one" in summary["stopped_by"] and "the same command asks again" in summary["stopped_by"]
    assert fake.state.calls["openai:create"] == 1  # no second create while the first is unknown
    summary = run_once(path, settings(tmp_path / "data"))
    assert summary["complete"] and summary["answered"] == 3 and fake.state.creates["openai"] == 1
    assert fake.state.answered == Counter({f"c{i}": 1 for i in range(3)}) and len(fake.state.live_files) == 1


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_results_that_stay_unreadable_past_the_window_stop_the_run_naming_the_batch(tmp_path: Path, fake: FakeBatchServer, api: str,
                                                                                    monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    fake.state.corrupt_results = 1000  # every download answers garbage
    path = write_jsonl(tmp_path / "exp.jsonl", rows("r", 2, api))
    data = tmp_path / "data"
    monkeypatch.setattr(jobs, "utcnow", lambda: datetime.now(timezone.utc) + timedelta(hours=49))  # the collector's clock: past any window
    summary = run_once(path, settings(data, max_attempts=2))
    [batch_id] = [j.id for j in fake.state.jobs.values()]
    assert not summary["complete"] and summary["live_batches"] == 1 and summary["failed"] == 0
    assert f"batch {batch_id}" in summary["stopped_by"] and "unreadable since" in summary["stopped_by"]
    assert "malformed response" in ledger(data).state_of(next(iter(ledger(data).intents)))
    fake.state.corrupt_results = 0
    summary = run_once(path, settings(data, max_attempts=2))
    assert summary["complete"] and summary["answered"] == 2 and sum(fake.state.creates.values()) == 1  # read later, never resent
    assert fake.state.answered == Counter({"r0": 1, "r1": 1})


def test_batches_list_shows_each_batch_as_last_read_its_age_and_its_cost(tmp_path: Path, fake: FakeBatchServer):
    from typer.testing import CliRunner

    from promptfleet.cli import app

    fake.state.hold = True
    path = write_jsonl(tmp_path / "my exp é.jsonl", rows("l", 2, "openai") + rows("l", 2, "anthropic"))
    data = tmp_path / "data"
    run_once(path, settings(data, batch_detach=True))
    fake.state.faults["anthropic:status"] = [404] * 2
    run_once(path, settings(data, batch_detach=True))  # the run reads the Anthropic batch: 404
    env = ["-d", str(data), "-e", str(tmp_path / "none.env")]
    offline = CliRunner().invoke(app, ["batches", "list", *env, "--offline"])
    assert offline.exit_code == 0, offline.output
    assert "my exp é" in offline.output and "unreadable since" in offline.output and "404" in offline.output
    assert "validating" in offline.output or "in_progress" in offline.output
    assert offline.output.count("<= $0.00") == 2 and "0m " in offline.output  # worst case at batch prices, age in seconds
    asked = CliRunner().invoke(app, ["batches", "list", *env])  # asks now: the second 404, then the OpenAI batch
    assert asked.exit_code == 0 and asked.output.count("unreadable since") == 1 and "sk-" not in asked.output


# One api each, so that the child imports one SDK: the after-create point is Anthropic's, whose batches carry no label.
KILL_POINTS = {
    "before create": ("openai", "create", "before"),
    "after create, before the journal": ("anthropic", "create", "after"),
    "while polling": ("gemini", "status", "before"),
    "while downloading": ("openai", "download", "before"),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_at_each_step_of_a_submission_then_every_prompt_is_paid_once(tmp_path: Path, fake: FakeBatchServer, point: str):
    api, route, phase = KILL_POINTS[point]
    fake.state.stall = (f"{api}:{route}", phase)
    path = write_jsonl(tmp_path / "exp.jsonl", rows("k", 4, api))
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", "tests.batch_driver", str(path), str(data)], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert fake.state.stalled.wait(60), child.stderr.read().decode()[-2000:] if child.poll() is not None else "never got there"
    finally:
        child.kill()
        child.wait()
        fake.state.release.set()
    summary = run_once(path, settings(data))
    assert summary["complete"] and summary["answered"] == 4 and fake.state.creates[api] == 1
    assert fake.state.submissions == Counter({f"k{i}": 1 for i in range(4)})  # no prompt in two batches
    assert fake.state.answered == Counter({f"k{i}": 1 for i in range(4)})  # each paid once
    assert len(own_answers(data, "exp")) == 4
    assert len(fake.state.live_files) == (1 if api == "openai" else 0)  # the batch's own file; any other was deleted
