"""The report's figures, sample, pages and command, checked against tables built here."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.core.rundir import Journal, RunPaths
from promptfleet.core.tables import TABLE_COLUMNS, write_tables
from promptfleet.evaluation import charts, stats
from promptfleet.evaluation.html import write_report
from promptfleet.evaluation.markdown import answer_table, run_markdown, study_markdown, table
from promptfleet.evaluation.report import read_report
from promptfleet.evaluation.sample import ANSWER_CHARS

JUDGE, YES_NO = "verdict_score_judge:template", "verdict_label_yes-no:template"
MODELS = {"alpha": 7.0, "beta": 5.0, "gamma": 4.0}  # each model's typical judge score


def _rows(prompts: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows, line = [], 0
    for p in range(prompts):
        for model, centre in MODELS.items():
            line += 1
            failed = model == "gamma" and p in (3, 9)
            judge_failed = model == "beta" and p == 5
            score = None if failed or judge_failed else float(min(10, max(1, round(rng.gauss(centre, 1.5)))))
            rows.append({
                "input_line": line, "id": f"{model}-{p}", "api": "test", "model_name": model,
                "status": "failed" if failed else "completed", "prompt": f"Question {p}: what is {p} + {p}?",
                "response": None if failed else f"{model} says {2 * p}" + (" and more" * 800 if p == 1 else ""),
                "latency_s": None if failed else round(rng.uniform(0.1, 2.0) * (1 + list(MODELS).index(model)), 3),
                "input_tokens": 10, "output_tokens": None if failed else 20 + p, "cost_usd": None if failed else 0.001 * (1 + list(MODELS).index(model)),
                "error_type": "rate_limited" if failed else None, "error_message": "too many" if failed else None,
                "verdict_text_judge:template": None if failed else ("garbled" if judge_failed else f"Score: {score}"),
                JUDGE: score, "verdict_text_yes-no:template": None if failed else "yes",
                YES_NO: None if failed else ("yes" if (score or 0) >= 5 else "no"),
                "score_match": None if failed else float(p % 2 == 0),
            })  # fmt: skip
    return rows


def _study(tmp_path: Path, prompts: int = 30, name: str = "exp") -> Path:
    path = tmp_path / f"01-02-2026-10-00-00-study-{name}.parquet"
    pl.DataFrame(_rows(prompts), infer_schema_length=None).write_parquet(path)
    return path


def test_wilson_interval_matches_the_published_values():
    interval = stats.wilson(8, 10)
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.4902, 0.9433)  # Wilson (1927), as in Newcombe (1998)
    nothing = stats.wilson(0, 12)
    assert nothing.low == 0.0 and 0.24 < nothing.high < 0.25 and nothing.method == stats.WILSON


def test_bootstrap_interval_is_seeded_and_agrees_with_the_normal_one():
    rng = random.Random(1)
    values = pl.Series([float(rng.randint(1, 10)) for _ in range(400)])
    once, again = stats.bootstrap_mean(values), stats.bootstrap_mean(values.shuffle(seed=3))
    assert once == again and once.method == stats.BOOTSTRAP  # the order a query returns the values in does not matter
    half = 1.96 * values.std() / 400**0.5
    assert once.low < once.mean < once.high
    assert abs((once.high - once.low) / 2 - half) / half < 0.15
    assert stats.bootstrap_mean(pl.Series([3.0])).low is None  # one value tells nothing of its spread
    big = stats.bootstrap_mean(pl.Series([float(i % 7) for i in range(stats.BOOTSTRAP_MAX + 1)]))
    assert big.method == stats.NORMAL and big.low < big.mean < big.high


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_figures_are_those_of_the_table(tmp_path: Path):
    path = _study(tmp_path)
    report = read_report(path)
    table_ = pl.read_parquet(path)
    answered = table_.filter(pl.col("status") == "completed")
    [judge, yes_no, match] = report.rankings
    assert (judge.metric.label, yes_no.metric.label, match.metric.label) == ("judge", "yes-no", "match")
    assert not judge.metric.proportion and yes_no.metric.proportion and match.metric.proportion
    means = {m: answered.filter(pl.col("model_name") == m)[JUDGE].mean() for m in MODELS}
    assert [s.model for s in judge.scores] == sorted(means, key=means.get, reverse=True)
    assert [s.best for s in judge.scores] == [True, False, False]
    for score in judge.scores:
        mine = answered.filter(pl.col("model_name") == score.model)[JUDGE]
        assert score.interval.mean == pytest.approx(mine.mean()) and score.interval.n == mine.count()
        assert score.interval.method == stats.BOOTSTRAP and score.interval.low < score.interval.mean < score.interval.high
        assert score.unscored == mine.null_count()  # beta's garbled verdict
    assert {s.model: s.unscored for s in judge.scores}["beta"] == 1
    for score in yes_no.scores:
        words = answered.filter(pl.col("model_name") == score.model)[YES_NO]
        assert score.interval.mean == pytest.approx((words == "yes").mean()) and score.interval.method == stats.WILSON
    gamma = report.model("gamma")
    rows = table_.filter(pl.col("model_name") == "gamma")
    latencies = rows["latency_s"].drop_nulls().to_list()
    assert (gamma.prompts, gamma.answered, gamma.failed) == (30, 28, 2)
    assert gamma.cost_usd == pytest.approx(rows["cost_usd"].sum()) and gamma.output_tokens == rows["output_tokens"].sum()
    assert (gamma.latency_p50_s, gamma.latency_p95_s) == (_nearest_rank(latencies, 0.5), _nearest_rank(latencies, 0.95))


def test_the_top_two_are_compared_on_the_prompts_both_answered(tmp_path: Path):
    report = read_report(_study(tmp_path))
    paired = report.paired[0]
    first, second = paired.first, paired.second
    assert [first, second] == [s.model for s in report.rankings[0].scores[:2]]
    by = {(r["model_name"], r["prompt"]): r[JUDGE] for r in _rows(30)}
    differences = [by[(first, p)] - by[(second, p)] for (m, p) in by if m == first and by[(m, p)] is not None and by[(second, p)] is not None]
    assert paired.difference.n == len(differences) == 29  # beta's unscored answer has no pair
    assert paired.difference.mean == pytest.approx(sum(differences) / len(differences))
    assert (paired.first_better, paired.second_better, paired.tied) == (
        sum(d > 0 for d in differences), sum(d < 0 for d in differences), sum(d == 0 for d in differences))  # fmt: skip
    assert paired.difference.low < paired.difference.mean < paired.difference.high


def test_sample_is_the_first_prompts_then_the_widest_disagreement(tmp_path: Path):
    rows = _rows(30)
    for row in rows:  # the models score as usual, but disagree most on prompt 20, then on prompt 12
        row.pop("score_match")
        if row["status"] == "completed":
            row[JUDGE], row[YES_NO] = MODELS[row["model_name"]], "yes"
            if row["prompt"].startswith(("Question 20:", "Question 12:")):
                row[JUDGE] = 10.0 if row["model_name"] == "alpha" else (1.0 if row["prompt"].startswith("Question 20:") else 2.0)
    path = tmp_path / "01-02-2026-10-00-00-study-exp.parquet"
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(path)
    sample = read_report(path, first=3, disagreeing=2).sample
    assert [(r.number, r.why.split()[0]) for r in sample.rows] == [(1, "first"), (2, "first"), (3, "first"), (21, "disagreement"), (13, "disagreement")]
    long = sample.rows[1].answers["alpha"]
    assert len(long.text) == ANSWER_CHARS and long.text.endswith("…") and set(long.verdicts) == {"judge", "yes-no"}
    assert sample.rows[0].answers["beta"].verdicts["judge"] != "-" and sample.prompts == 30


def test_answer_table_is_bounded(tmp_path: Path):
    report = read_report(_study(tmp_path), first=20, disagreeing=0)
    rows, left_out = answer_table(report)
    assert len(rows) == 20 * 3 and left_out == 0
    assert list(rows[0]) == ["#", "why", "prompt", "model", "judge", "yes-no", "match", "answer"]
    assert [r["model"] for r in rows[:3]] == list(MODELS) and {r["#"] for r in rows[:3]} == {"1"}
    small, dropped = answer_table(report, max_bytes=3000)
    assert 0 < len(small) < 60 and len(small) % 3 == 0 and dropped == 20 - len(small) // 3  # whole prompts only
    assert len(json.dumps(small, ensure_ascii=False).encode()) <= 3000


def _png_width(uri: str) -> tuple[int, int]:
    png = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])[0], len(png)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.loads += [(value or "")[:5] for name, value in attrs if name in ("src", "href", "srcset", "action", "poster")]


def _loads(page: str) -> list[str]:
    parser = _Tags()
    parser.feed(page)
    assert not parser.tags & {"script", "link", "iframe", "object", "embed"}
    return parser.loads


def test_offline_page_holds_everything_and_loads_nothing(tmp_path: Path):
    rows = _rows(12)
    rows[0]["response"] = "<img src=http://example.invalid/x.png onerror=alert(1)> <script>alert(2)</script>"
    path = tmp_path / "01-02-2026-10-00-00-study-données é.parquet"
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(path)
    written = write_report(path)
    assert written.html == tmp_path / "01-02-2026-10-00-00-study-report-données é.html"
    page = written.html.read_text(encoding="utf-8")
    assert "default-src 'none'; img-src data:" in page  # the page may load nothing but its own data: images
    assert "<script" not in page and "&lt;img src=http://example.invalid" in page
    assert _loads(page) == ["data:"] * 3  # the three charts, and nothing from anywhere
    images = re.findall(r"src='(data:image/png;base64,[^']+)'", page)
    assert len(images) == 3 == len(written.charts)
    for uri in images:
        width, size = _png_width(uri)
        assert width == 850 and size < 200_000
    shown = written.report.rankings[0].scores[0]
    assert f"{shown.interval.mean:.2f} [{shown.interval.low:.2f}, {shown.interval.high:.2f}]" in page
    assert not list(tmp_path.glob(".*.part"))


def test_without_matplotlib_the_report_is_tables_and_says_how_to_get_the_charts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(charts, "available", lambda: False)
    written = write_report(_study(tmp_path))
    page = written.html.read_text(encoding="utf-8")
    assert written.charts is None and "<img" not in page and "<code>pip install &#x27;promptfleet[report]&#x27;</code>" in page
    markdown = study_markdown(written.report, None, charts.INSTALL_HINT, "answers-exp")
    assert "pip install 'promptfleet[report]'" in markdown and "data:image" not in markdown


def test_markdown_keeps_names_from_breaking_tables_or_loading_anything():
    hostile = {"model": "evil | ![x](http://example.invalid/y.png) <b>", "mean": "1.00"}
    text = table([hostile, {"model": "plain", "mean": "2.00"}])
    lines = text.splitlines()
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in lines if line.startswith("| ")} == {3}  # two cells on every row
    assert not re.search(r"(?<!\\)\]\(", text) and "<b>" not in text  # no image or link syntax, no tag


def test_a_run_without_judges_reports_its_models_and_what_batch_saved(tmp_path: Path):
    rows = [{k: v for k, v in r.items() if not k.startswith(("verdict_", "score_"))} for r in _rows(10)]
    path = tmp_path / "01-02-2026-10-00-00-results-plain.parquet"
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(path)
    written = write_report(path, batch_saved_usd=0.25)
    assert written.report.kind == "run" and written.report.rankings == []
    assert [c.name for c in written.charts] == ["latency", "cost"]
    markdown = run_markdown(written.report, written.charts, charts.INSTALL_HINT)
    assert "Batch prices saved $0.25 against online prices" in markdown and markdown.count("data:image/png") == 2
    assert "| alpha | 10 | 0 |" in markdown  # the per-model table: answered, failed


def test_report_command(tmp_path: Path):
    study = _study(tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["report", str(study)])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "01-02-2026-10-00-00-study-report-exp.html").stat().st_size > 10_000
    elsewhere = runner.invoke(app, ["report", str(study), "-o", str(tmp_path / "mine.html")])
    assert elsewhere.exit_code == 0 and (tmp_path / "mine.html").exists()
    (tmp_path / "01-02-2026-10-00-00-results-bad.parquet").write_text("not parquet")
    (tmp_path / "exp.jsonl").write_text("{}\n")
    for args, says in (
        ([str(tmp_path / "nope.parquet")], "file not found"),
        ([str(tmp_path / "exp.jsonl")], "not a results or study table"),
        ([str(tmp_path / "01-02-2026-10-00-00-results-bad.parquet")], "cannot read it as a promptfleet table"),
        ([str(study), "-o", str(tmp_path / "no" / "such" / "page.html")], "its folder does not exist"),
    ):
        refused = runner.invoke(app, ["report", *args])
        assert refused.exit_code == 1 and says in refused.output and "Traceback" not in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1


def test_an_empty_run_and_a_model_that_only_failed_still_report(tmp_path: Path):
    schema = {name: getattr(pl, dtype) for name, dtype in TABLE_COLUMNS.items()}
    empty = tmp_path / "01-02-2026-10-00-00-results-empty.parquet"
    pl.DataFrame([], schema=schema).write_parquet(empty)
    assert write_report(empty).report.models == []
    failing = tmp_path / "01-02-2026-10-00-00-results-failing.parquet"
    pl.DataFrame([{"input_line": 1, "api": "test", "model_name": "down", "status": "failed", "prompt": "q", "error_type": "bad_request",
                   "error_message": "no such model"},
                  {"input_line": 2, "api": "test", "model_name": "up", "status": "completed", "prompt": "q", "response": "a", "latency_s": 0.5}],
                 schema=schema).write_parquet(failing)  # fmt: skip
    written = write_report(failing)
    down = written.report.model("down")
    assert (down.failed, down.latency_p50_s, down.cost_usd) == (1, None, None)
    assert written.report.sample.rows[0].answers["down"].text == "failed: bad_request no such model"


def test_many_scores_take_the_normal_interval_from_sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(stats, "BOOTSTRAP_MAX", 5)  # as a run with more than 10,000 scores a model
    path = _study(tmp_path)
    report = read_report(path)
    answered = pl.read_parquet(path).filter(pl.col("status") == "completed")
    for score in report.rankings[0].scores:
        mine = answered.filter(pl.col("model_name") == score.model)[JUDGE].drop_nulls()
        half = stats.Z95 * mine.std() / mine.len() ** 0.5
        assert score.interval.method == stats.NORMAL and score.interval.mean == pytest.approx(mine.mean())
        assert (score.interval.low, score.interval.high) == pytest.approx((mine.mean() - half, mine.mean() + half))
    assert report.paired[0].difference.method == stats.NORMAL and report.paired[0].difference.n == 29
    assert any("normal approximation" in line for line in report.methods)


def test_each_model_reads_as_in_the_run_summary(tmp_path: Path):
    """One nearest-rank rule for p50/p95 in the report and the run summary, checked where rules
    part ways (1, 2, 3 and 20 latencies), with answers that have no latency and failures."""
    paths = RunPaths(tmp_path, "01-02-2026-10-00-00", "exp")
    journal, rng, line = Journal(paths), random.Random(5), 0
    for model, timed in (("one", 1), ("two", 2), ("three", 3), ("twenty", 20), ("untimed", 0)):
        for n in range(timed + 2):  # `timed` latencies, then an answer without one, then a failure
            line += 1
            record = {"input_line": line, "api": "test", "model_name": model, "prompt": f"q{line}"}
            if n <= timed:
                latency = round(rng.uniform(0.05, 3.0), 3) if n < timed else None
                journal.write("completed", {**record, "response": "r", "latency_s": latency, "usage": {"input_tokens": 3, "output_tokens": n}})
            else:
                journal.write("failed", {**record, "error": {"type": "server_error", "attempts": 1}})
    journal.close()
    summary = {row["model_name"]: row for row in write_tables(paths).to_dicts()}
    report = read_report(paths.parquet)
    assert sorted(m.model for m in report.models) == sorted(summary)
    figures = ("prompts", "answered", "failed", "input_tokens", "output_tokens", "latency_p50_s", "latency_p95_s")
    for model, row in summary.items():
        mine = report.model(model)
        assert tuple(getattr(mine, f) for f in figures) == tuple(row[f] for f in figures), model
    two = sorted(pl.read_parquet(paths.parquet).filter(pl.col("model_name") == "two")["latency_s"].drop_nulls())
    assert report.model("two").latency_p50_s == two[1]  # nearest rank: the upper one, not their mean
    assert report.model("untimed").latency_p50_s is None


_PEAK = """
import sys
from pathlib import Path
from promptfleet.evaluation.html import write_report
written = write_report(Path(sys.argv[1]))
peak = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
print(sum(m.prompts for m in written.report.models), written.report.sample.prompts, peak)
"""  # VmHWM, not ru_maxrss: that one starts from the RSS of the process that forked it (this one)


def _run_table(path: Path, rows: int) -> Path:
    """A run's table of `rows` prompts to two models, a few failed, built by polars in a second."""
    line = pl.int_range(1, rows + 1, dtype=pl.Int64)
    failed = line % 997 == 0
    model = pl.when(line % 4 == 0).then(pl.lit("b")).otherwise(pl.lit("m"))
    table = pl.select(input_line=line, api=pl.lit("test"), model_name=model, status=pl.when(failed).then(pl.lit("failed")).otherwise(pl.lit("completed")),
                      prompt=pl.format("question {}", line), response=pl.when(~failed).then(pl.format("test reply to question {}", line)),
                      latency_s=pl.when(~failed).then((line.hash(seed=1) % 20_000 + 1).cast(pl.Float64) / 10_000),
                      input_tokens=pl.lit(2, pl.Int64), output_tokens=pl.when(~failed).then(pl.lit(7, pl.Int64)),
                      cost_usd=pl.when(~failed & (model == "b")).then(pl.lit(1e-6)))  # fmt: skip
    schema = {name: getattr(pl, dtype) for name, dtype in TABLE_COLUMNS.items()}
    table.with_columns(pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in table.columns).select(*schema).write_parquet(path, row_group_size=5_000)  # as TableWriter writes
    return path


@pytest.mark.slow
def test_the_report_of_a_million_rows_holds_a_few_columns_not_the_table(tmp_path: Path):
    """Peak memory of a fresh process writing the report of 1,000,000 rows, over that of one
    reporting 1,000 (imports and charts cost both the same), with two polars threads as on
    this machine so that the bound does not move with the cores. Measured: ~20 MB more here;
    ~230 MB more when the report sorted latencies inside its aggregation and grouped the
    prompts in a hash table."""
    env = {**os.environ, "POLARS_MAX_THREADS": "2"}

    def peak_kib(rows: int) -> int:
        path = _run_table(tmp_path / f"01-02-2026-10-00-00-results-r{rows}.parquet", rows)
        done = subprocess.run([sys.executable, "-c", _PEAK, str(path)], check=False, capture_output=True, text=True, env=env, timeout=300)
        prompts, distinct, kib = map(int, done.stdout.split())
        assert prompts == distinct == rows, done.stderr[-2000:]
        return kib

    small, big = peak_kib(1_000), peak_kib(1_000_000)
    assert big - small < 128 * 1024, (small, big)
