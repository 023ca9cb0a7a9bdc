"""The study as a user looks at it: a study over three models and two judges run by the
command, its artifacts read back through the Prefect API, the Prefect UI's artifact pages and
the offline page opened in headless Chromium (skipped without chromium)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.core.slug import slug
from promptfleet.evaluation.markdown import ANSWERS_MAX_BYTES
from tests.browser import chromium, look
from tests.conftest import write_jsonl

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
NAME = "étude"  # an experiment name the artifact keys must slug
MODELS = ("test-small", "test-medium", "test-large")
SCORE = "verdict_score_test-judge:template"
QUESTIONS = [f"Question {n}: name {n} things that are blue." for n in range(12)]


@dataclass
class Study:
    out: Path
    table: pl.DataFrame  # the study table
    html: Path
    output: str  # what the command printed


def _run(folder: Path, *judges: str) -> str:
    experiment = folder / f"{NAME}.jsonl"
    result = CliRunner().invoke(app, [
        "run", "-f", str(experiment), "-d", str(folder / "data"), "--create-data-folder", "--prices", str(folder / "prices.json"), "-mq", "6000",
        "--judge-folder", str(REPO / "data/judge"), "--judge", ",".join(judges),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    folder = tmp_path_factory.mktemp("a study")  # a space in every path
    write_jsonl(folder / f"{NAME}.jsonl", [{"id": f"{m}-{n}", "api": "test", "model_name": m, "prompt": q,
                                          "parameters": {"latency": 0.01 * (1 + i) * (1 + n % 3)}}
                                         for n, q in enumerate(QUESTIONS) for i, m in enumerate(MODELS)])  # fmt: skip
    (folder / "prices.json").write_text(json.dumps({m: {"input": 1.0 * (i + 1), "output": 4.0 * (i + 1)} for i, m in enumerate(MODELS)}))
    output = _run(folder, "test-judge", "test-yes-no")
    out = folder / "data" / "output" / NAME
    [table] = sorted(out.glob(f"*-study-{NAME}.parquet"))
    [html] = sorted(out.glob(f"*-study-report-{NAME}.html"))
    assert len(list(out.glob(f"*-report-{NAME}.html"))) == 2  # the run's own page is kept beside the study's
    return Study(out, pl.read_parquet(table), html, output)


def _artifacts(api: str, key: str) -> list[dict]:
    found = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"}, timeout=30)
    return found.raise_for_status().json()


def _pngs(markdown: str) -> list[tuple[int, int, int]]:
    """(width, height, bytes) of every data: PNG in the text."""
    found = []
    for data in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown):
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        found.append((*struct.unpack(">II", png[16:24]), len(png)))
    return found


def _means(table: pl.DataFrame) -> dict[str, float]:
    scored = table.filter(pl.col("status") == "completed").group_by("model_name").agg(pl.col(SCORE).mean())
    return dict(zip(scored["model_name"], scored[SCORE]))


def test_study_artifacts_hold_ranked_intervals_charts_and_answers(study: Study, prefect_api: str):
    [artifact] = _artifacts(prefect_api, f"study-{slug(NAME)}")
    markdown = artifact["data"]
    assert artifact["type"] == "markdown" and len(markdown.encode()) < 600_000
    charts = _pngs(markdown)
    assert len(charts) == 3 and all(width == 850 and height > 100 and size < 200_000 for width, height, size in charts)
    means = _means(study.table)
    best = max(means, key=means.get)
    assert re.search(rf"\| ★ 1 \| {best} \| {means[best]:.2f} \\\[", markdown), markdown[:3000]
    for model, mean in means.items():
        assert f"| {model} | {mean:.2f} \\[" in markdown
    assert "## Top two, prompt by prompt" in markdown and "percentile bootstrap, 2,000 resamples" in markdown and "Wilson" in markdown
    assert str(study.html) in markdown and "report" in study.output

    [answers] = _artifacts(prefect_api, f"answers-{slug(NAME)}")
    rows = json.loads(answers["data"])
    assert answers["type"] == "table" and len(answers["data"].encode()) <= ANSWERS_MAX_BYTES
    assert len(rows) == len(QUESTIONS) * len(MODELS) and [r["#"] for r in rows[:30:3]] == [str(n) for n in range(1, 11)]
    first = study.table.filter(pl.col("prompt") == QUESTIONS[0])
    for row in rows[:3]:
        verdict = first.filter(pl.col("model_name") == row["model"])[SCORE][0]
        assert (row["test-judge"], row["test-yes-no"]) == (f"{verdict:g}", "yes") and row["answer"].startswith("test reply ")

    [summary] = _artifacts(prefect_api, f"summary-{slug(NAME)}")
    run_charts = _pngs(summary["data"])
    assert "# Report" in summary["data"] and summary["data"].count("## Models") == 1 and len(run_charts) == 2 and all(size < 200_000 for _, _, size in run_charts)
    judged = httpx.post(f"{prefect_api}/artifacts/filter", json={"artifacts": {"key": {"like_": "summary-judge-"}}}, timeout=30).json()
    assert judged and all("# Report" not in a["data"] for a in judged)  # a judge run's report is its study


def test_a_second_judging_adds_to_the_history_of_the_same_key(study: Study, prefect_api: str):
    _run(study.out.parent.parent.parent, "test-judge")
    key = f"study-{slug(NAME)}"
    assert len(_artifacts(prefect_api, key)) == 2  # the Artifacts page keeps both versions
    latest = httpx.post(f"{prefect_api}/artifacts/latest/filter", json={"artifacts": {"key": {"any_": [key]}}}, timeout=30).json()
    assert len(latest) == 1


@pytest.fixture(scope="module")
def prefect_ui(prefect_api: str):
    """The Prefect UI, served on a port of its own and talking to the session's server (whose
    test harness serves no UI)."""
    chromium()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = "import sys, uvicorn; from prefect.server.api.server import create_ui_app; uvicorn.run(create_ui_app(False), fd=int(sys.argv[1]), log_level='warning')"
    server = subprocess.Popen([sys.executable, "-c", code, str(listener.fileno())], pass_fds=[listener.fileno()],
                              env={**os.environ, "PREFECT_UI_API_URL": prefect_api})  # fmt: skip
    listener.close()
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                assert httpx.get(f"{url}/ui-settings", timeout=5).json()["api_url"] == prefect_api
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "the UI did not start"
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _own_errors(errors: list[str]) -> list[str]:
    """The console's errors, less the UI's own missing favicon."""
    return [e for e in errors if "favicon.ico" not in e]


def test_prefect_ui_shows_the_study_at_1400_px(study: Study, prefect_api: str, prefect_ui: str):
    artifact = _artifacts(prefect_api, f"study-{slug(NAME)}")[0]
    page = look(f"{prefect_ui}/artifacts/artifact/{artifact['id']}", "Top two, prompt by prompt", width=1400)
    assert _own_errors(page.errors) == []
    assert len(page.images) == len(_pngs(artifact["data"])) >= 1
    assert all(image["width"] == 850 and 0 < image["shown"] <= 1400 for image in page.images), page.images
    means = _means(study.table)
    for model, mean in means.items():
        assert re.search(rf"{model}\s+{mean:.2f} \[", page.text), page.text[:3000]
    answers = _artifacts(prefect_api, f"answers-{slug(NAME)}")[0]
    table = look(f"{prefect_ui}/artifacts/artifact/{answers['id']}", QUESTIONS[0], width=1400)
    assert _own_errors(table.errors) == [] and "test-judge" in table.text and "test reply " in table.text


def test_offline_page_opens_from_disk_with_everything_in_it(study: Study):
    page = look(study.html.as_uri(), "Answers side by side", width=1400)
    assert page.errors == []
    assert [i["width"] for i in page.images] == [850, 850, 850] and all(i["shown"] == 850 for i in page.images)
    assert {r.split(":", 1)[0] for r in page.requests} == {"file", "data"}  # nothing from any server
    for model, mean in _means(study.table).items():
        assert re.search(rf"{model}\s+{mean:.2f} \[", page.text)
    assert all(q in page.text for q in QUESTIONS[:10])


def test_a_report_that_fails_costs_the_report_not_the_run(tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch):
    import promptfleet.evaluation.html

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(promptfleet.evaluation.html, "write_report", disk_full)
    path = write_jsonl(tmp_path / "full disk.jsonl", [{"id": n, "api": "test", "model_name": "m", "prompt": f"q{n}"} for n in range(3)])
    result = CliRunner().invoke(app, ["run", "-f", str(path), "-d", str(tmp_path / "data"), "--create-data-folder"])
    assert result.exit_code == 0, result.output
    assert "3 answered" in result.output and not list((tmp_path / "data").rglob("*-report-*"))
    [summary] = _artifacts(prefect_api, f"summary-{slug('full disk')}")
    assert "## Outputs" in summary["data"] and "# Report" not in summary["data"]
    deadline = time.monotonic() + 30
    while True:  # the warning is in the flow run's logs (sent to the server in batches)
        logs = httpx.post(f"{prefect_api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [summary["flow_run_id"]]}}}, timeout=30).json()
        if any("no report (OSError: [Errno 28] No space left on device)" in log["message"] for log in logs):
            break
        assert time.monotonic() < deadline, [log["message"] for log in logs]
        time.sleep(0.5)
