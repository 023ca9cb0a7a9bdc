"""A report as markdown, for the Prefect UI's artifacts (which render `data:` images).

Every string that comes from the user's data (model, judge and scorer names) is escaped, so
a name can neither break a table nor make the UI load anything from elsewhere.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from promptfleet.evaluation import report_rows as rows

if TYPE_CHECKING:
    from promptfleet.evaluation.charts import Chart
    from promptfleet.evaluation.report import Report

_PUNCTUATION = re.compile(r"([\\`*_\[\]|~])")  # what could format, link or end a cell
ANSWERS_MAX_BYTES = 120_000  # the side-by-side table artifact; the full answers stay in the tables


def escape(text: str) -> str:
    text = " ".join(text.split()).replace("&", "&amp;").replace("<", "&lt;")
    return _PUNCTUATION.sub(r"\\\1", text)


def table(data: list[dict[str, str]]) -> str:
    if not data:
        return "(nothing)\n"
    columns = list(data[0])
    head = "| " + " | ".join(escape(c) for c in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(escape(r.get(c, "")) for c in columns) + " |\n" for r in data)


def _charts(charts: list[Chart] | None, hint: str) -> str:
    if charts is None:
        return f"{hint}\n"
    return "".join(f"![{chart.title}]({chart.data_uri})\n\n" for chart in charts)


def report_sections(report: Report, charts: list[Chart] | None, hint: str) -> str:
    """The rankings, the paired comparisons, the charts and the models."""
    parts = []
    if best := rows.best_lines(report):
        parts.append("\n".join(f"- {escape(line)}" for line in best) + "\n")
    if paired := rows.paired_rows(report):
        parts.append("## Top two, prompt by prompt\n\n" + table(paired))
    elif report.paired:
        parts.append(rows.PAIRED_NONE + "\n")
    for ranking in report.rankings:
        unit = "% of answers" if ranking.metric.proportion else "mean score"
        parts.append(f"## {escape(ranking.metric.label)} ({ranking.metric.source}, {unit})\n\n" + table(rows.ranking_rows(report, ranking)))
    parts.append("## Charts\n\n" + _charts(charts, hint))
    parts.append("## Models\n\n" + table(rows.model_rows(report)))
    if report.methods:
        parts.append("95% intervals: " + "; ".join(escape(m) for m in report.methods) + ".\n")
    return "\n".join(parts)


def study_markdown(report: Report, charts: list[Chart] | None, hint: str, answers_key: str) -> str:
    return (
        f"# Study: {escape(report.name)}\n\n{escape(rows.headline(report))}\n\n{report_sections(report, charts, hint)}\n"
        f"## Files\n\n- answers side by side: artifact `{answers_key}` ({len(report.sample.rows)} of "
        f"{report.sample.prompts} prompts)\n- table (every row): `{report.source}`\n- offline report: `{report.html_path}`\n"
    )


def run_markdown(report: Report, charts: list[Chart] | None, hint: str) -> str:
    """What a run's summary artifact gains: the models' cost and latency, and their charts."""
    saved = f"\nBatch prices saved {rows.usd(report.batch_saved_usd)} against online prices.\n" if report.batch_saved_usd else ""
    return f"\n# Report\n{saved}\n{report_sections(report, charts, hint)}\n- offline report: `{report.html_path}`\n"


def answer_table(report: Report, max_bytes: int = ANSWERS_MAX_BYTES) -> tuple[list[dict[str, str]], int]:
    """The side-by-side rows of the sampled prompts whose rows fit in `max_bytes` of JSON, and
    how many prompts were left out."""
    groups = rows.answer_rows(report.sample)
    kept: list[dict[str, str]] = []
    size = 2
    for n, group in enumerate(groups):
        size += sum(len(json.dumps(row, ensure_ascii=False).encode()) + 2 for row in group)
        if size > max_bytes:
            return kept, len(groups) - n
        kept += group
    return kept, 0
