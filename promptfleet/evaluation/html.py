"""The report as one HTML file beside the outputs, for people without the Prefect server.

Everything is inline (styles, charts as `data:` images) and a Content-Security-Policy
forbids the page any other load, so it opens from disk with no network and an answer that
contains HTML shows as text. Written to a temporary name and renamed: a reader never sees
half a page.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path

from promptfleet.evaluation import report_rows as rows
from promptfleet.evaluation.charts import INSTALL_HINT, Chart, draw_charts
from promptfleet.evaluation.report import Report, read_report

STYLE = """
:root { color-scheme: dark; }
body { background: #16181f; color: #e6e8ef; font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1320px; padding: 0 16px; }
h1 { font-size: 24px; margin: 0 0 6px; } h2 { font-size: 18px; margin: 28px 0 8px; color: #c9cde0; }
.muted { color: #9aa0b0; } code { color: #ffd166; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #3a3f4e; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #1e212b; } tr.best td { background: #2a2718; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { display: block; max-width: 100%; margin: 8px 0 16px; border-radius: 4px; }
.answers td { max-width: 360px; overflow-wrap: anywhere; } .verdict { display: inline-block; background: #2c3140;
  border-radius: 3px; padding: 0 5px; margin: 0 4px 3px 0; font-size: 13px; white-space: nowrap; }
"""
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_TEXT_COLUMNS = {"rank", "model", "metric", "first − second", "reads"}


def _table(data: list[dict[str, str]], best: list[bool] | None = None) -> str:
    if not data:
        return "<p class='muted'>(nothing)</p>"
    columns = list(data[0])
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for n, row in enumerate(data):
        cells = "".join(f"<td{'' if c in _TEXT_COLUMNS else ' class=num'}>{escape(row.get(c, ''))}</td>" for c in columns)
        body.append(f"<tr{' class=best' if best and best[n] else ''}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _answers(report: Report) -> str:
    sample = report.sample
    head = "<th>#</th><th>why</th><th>prompt</th>" + "".join(f"<th>{escape(m)}</th>" for m in sample.models)
    body = []
    for row in sample.rows:
        cells = [f"<td class=num>{row.number}</td>", f"<td>{escape(row.why)}</td>", f"<td>{escape(row.prompt)}</td>"]
        for model in sample.models:
            answer = row.answers.get(model)
            if answer is None:
                cells.append("<td class='muted'>(not asked)</td>")
                continue
            badges = "".join(f"<span class=verdict>{escape(label)} {escape(value)}</span>" for label, value in answer.verdicts.items())
            cells.append(f"<td>{badges}{'<br>' if badges else ''}{escape(answer.text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class=answers><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(report: Report, charts: list[Chart] | None, hint: str) -> str:
    parts = [f"<h1>{'Study' if report.kind == 'study' else 'Run'}: {escape(report.name)}</h1>",
             f"<p class=muted>{escape(rows.headline(report))}</p>"]  # fmt: skip
    if best := rows.best_lines(report):
        parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in best) + "</ul>")
    if paired := rows.paired_rows(report):
        parts.append("<h2>Top two, prompt by prompt</h2>" + _table(paired))
    elif report.paired:
        parts.append(f"<p class=muted>{escape(rows.PAIRED_NONE)}</p>")
    for ranking in report.rankings:
        unit = "% of answers" if ranking.metric.proportion else "mean score"
        parts.append(f"<h2>{escape(ranking.metric.label)} <span class=muted>({ranking.metric.source}, {unit})</span></h2>")
        parts.append(_table(rows.ranking_rows(report, ranking), [s.best for s in ranking.scores]))
    parts.append("<h2>Charts</h2>")
    if charts is None:
        parts.append("<p class=muted>" + re.sub(r"`([^`]*)`", r"<code>\1</code>", escape(hint)) + "</p>")
    parts += [f"<img alt='{escape(c.title)}' title='{escape(c.title)}' src='{c.data_uri}'>" for c in charts or []]
    parts.append("<h2>Models</h2>" + _table(rows.model_rows(report)))
    if report.batch_saved_usd:
        parts.append(f"<p>Batch prices saved {escape(rows.usd(report.batch_saved_usd))} against online prices.</p>")
    shown = f"{len(report.sample.rows)} of {report.sample.prompts} prompts: the first ones, then where models or judges disagree most"
    parts.append(f"<h2>Answers side by side</h2><p class=muted>{escape(shown)}; texts trimmed.</p>" + _answers(report))
    if report.methods:
        parts.append("<p class=muted>95% intervals: " + escape("; ".join(report.methods)) + ".</p>")
    parts.append(f"<p class=muted>Every row: <code>{escape(str(report.source))}</code></p>")
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv='Content-Security-Policy' content=\"{POLICY}\">"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{escape(report.name)} — promptfleet report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_html(report: Report, charts: list[Chart] | None, hint: str, path: Path | None = None) -> Path:
    path = path or report.html_path
    temporary = path.with_name(f".{path.name}.part")
    try:
        temporary.write_text(render(report, charts, hint), encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class Written:
    report: Report
    charts: list[Chart] | None  # None: matplotlib is not installed
    html: Path


def write_report(table: Path, batch_saved_usd: float | None = None, out: Path | None = None) -> Written:
    """Read a results or study table, draw its charts and write the offline page (beside the
    table unless `out` says where)."""
    report = read_report(table, batch_saved_usd)
    charts = draw_charts(report)
    return Written(report, charts, write_html(report, charts, INSTALL_HINT, out))
