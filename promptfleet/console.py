"""What people see: the end-of-run summary (terminal and Prefect artifact) and live progress."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from promptfleet import runtime

QUEUE_COLUMNS = ("queue", "rate_per_minute", "rate_at_end", "prompts", "already_done", "answered", "failed", "retries", "rate_limited", "latency_p50_s", "latency_p95_s", "wall_s")
MODEL_COLUMNS = ("api", "model_name", "prompts", "answered", "failed", "latency_p50_s", "latency_p95_s", "input_tokens", "output_tokens")
LABELS = {
    "rate_per_minute": "rate/min",
    "rate_at_end": "now/min",
    "already_done": "resumed",
    "rate_limited": "429s",
    "latency_p50_s": "p50 s",
    "latency_p95_s": "p95 s",
    "wall_s": "wall s",
    "model_name": "model",
    "input_tokens": "tok in",
    "output_tokens": "tok out",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _headline(summary: dict[str, Any]) -> str:
    state = "complete" if summary["complete"] else f"stopped with {summary['unfinished']} unfinished"
    if summary.get("budget_stop"):
        state += f" ({summary['budget_stop']})"
    resumed = " (resumed)" if summary["resumed"] else ""
    cost = summary.get("cost") or {}
    spent = f", {cost.get('input_tokens', 0) + cost.get('output_tokens', 0)} tokens, about ${cost.get('estimated_usd') or 0:.4f}"
    if cost.get("unpriced_models"):
        spent += f" + unpriced {', '.join(cost['unpriced_models'])}"
    return (
        f"{summary['experiment']}{resumed}: {summary['prompts']} prompts, {summary['answered']} answered, "
        f"{summary['failed']} failed, {summary['retries']} retries{spent}, {summary['wall_s']:.1f}s — {state}"
    )


def table_markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> str:
    columns = columns or (tuple(rows[0]) if rows else ())
    if not columns:
        return "(nothing)"
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def summary_markdown(summary: dict[str, Any]) -> str:
    outputs = "".join(f"- {kind}: `{path}`\n" for kind, path in summary["outputs"].items())
    return (
        f"# {summary['experiment']}\n\n{_headline(summary)}\n\n## Queues\n\n{table_markdown(summary['queues'], QUEUE_COLUMNS)}"
        f"\n## Models\n\n{table_markdown(summary['models'], MODEL_COLUMNS)}\n## Outputs\n\n{outputs}"
    )


def print_summary(summary: dict[str, Any], console: Console) -> None:
    for title, rows, columns in (("queues", summary["queues"], QUEUE_COLUMNS), ("models", summary["models"], MODEL_COLUMNS)):
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(LABELS.get(column, column), justify="left" if column in ("queue", "api", "model_name") else "right")
        for row in rows:
            table.add_row(*(_fmt(row.get(c)) for c in columns))
        console.print(table)
    console.print(_headline(summary))
    for kind, path in summary["outputs"].items():
        console.print(f"  {kind:9} {path}", soft_wrap=True, highlight=False)


def _progress_table() -> Table:
    table = Table(title="progress", title_justify="left")
    for column in ("queue", "rate/min", "now/min", "done", "answered", "failed", "retries", "429s", "in flight", "sent/s"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for run in runtime.active_runs():
        for stats in run.stats.values():
            table.add_row(
                stats.name,
                _fmt(stats.rate),
                _fmt(stats.rate_now or stats.rate),
                f"{stats.done + stats.skipped}/{stats.total}",
                str(stats.answered),
                str(stats.failed),
                str(stats.retries),
                str(stats.rate_limited),
                str(stats.in_flight),
                f"{stats.sent / max(stats.elapsed, 1e-9):.1f}",
            )
    return table


def _progress_line() -> str:
    parts = []
    for run in runtime.active_runs():
        for s in run.stats.values():
            parts.append(
                f"{s.name}: {s.done + s.skipped}/{s.total} done, {s.failed} failed, {s.retries} retries, "
                f"{s.rate_limited} rate-limited, rate {s.rate_now or s.rate:.0f}/min"
            )
    return "; ".join(parts)


async def show_progress(console: Console, interval: float | None = None) -> None:
    """Live table on a terminal; a plain line every 10 s otherwise (CI, logs). Cancel to stop."""
    if console.is_terminal:
        with Live(_progress_table(), console=console, refresh_per_second=4, transient=True) as live:
            while True:
                await asyncio.sleep(interval or 0.25)
                live.update(_progress_table())
    last = time.monotonic()
    while True:
        await asyncio.sleep(interval or 10)
        if line := _progress_line():
            print(f"[progress {time.monotonic() - last:.0f}s] {line}", file=sys.stderr, flush=True)


def print_study(result: dict[str, Any], console: Console) -> None:
    """What the chained steps made: rephrase runs, the judge run and the study table."""
    if rephrase := result.get("rephrase"):
        console.print(_headline(rephrase["rephrase_run"]))
    if judged := result.get("judge"):
        made = judged["judge_file"]
        skipped = f" ({made['skipped_failed']} failed prompt(s) not judged)" if made["skipped_failed"] else ""
        console.print(f"judge file: {made['file']}: {made['records']} prompt(s){skipped}", soft_wrap=True, highlight=False)
        console.print(_headline(judged["judge_run"]))
        study = judged["study"]
        if study["summary"]:
            table = Table(title="verdicts per model and judge", title_justify="left")
            columns = list(study["summary"][0])
            for column in columns:
                table.add_column(column)
            for row in study["summary"]:
                table.add_row(*(_fmt(row.get(c)) for c in columns))
            console.print(table)
        console.print(f"  study     {study['parquet']}\n  study     {study['csv']}", soft_wrap=True, highlight=False)
