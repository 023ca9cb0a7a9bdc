"""What people see: the end-of-run summary (terminal and Prefect artifact) and live progress."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from promptfleet.core.session import Session
from promptfleet.core.summary import (
    BATCH_COLUMNS,
    LABELS,
    MODEL_COLUMNS,
    QUEUE_COLUMNS,
    RunSummary,
    fmt,
    headline,
)

if TYPE_CHECKING:
    from promptfleet.core.summary import RunSummary
    from promptfleet.evaluation.outcomes import Study


def print_summary(summary: RunSummary, console: Console) -> None:
    tables = () if summary.reused else (("queues", summary.queues, QUEUE_COLUMNS), ("models", summary.models, MODEL_COLUMNS))
    for title, rows, columns in tables:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(LABELS.get(column, column), justify="left" if column in ("queue", "api", "model_name") else "right")
        for row in rows:
            table.add_row(*(fmt(row.get(c)) for c in columns))
        console.print(table)
    if summary.batches:
        table = Table(title="batches", title_justify="left")
        for column in BATCH_COLUMNS:
            table.add_column(column, justify="right" if column == "prompts" else "left")
        for row in summary.batches:
            table.add_row(*(fmt(row.get(c)) for c in BATCH_COLUMNS))
        console.print(table)
    console.print(headline(summary))
    for kind, path in summary.outputs.items():
        console.print(f"  {kind:9} {path}", soft_wrap=True, highlight=False)
    if url := summary.flow_run_url:
        console.print(f"  {'prefect':9} {url}", soft_wrap=True, highlight=False)


def _progress_table(session: Session) -> Table:
    table = Table(title="progress", title_justify="left")
    for column in ("queue", "rate/min", "now/min", "done", "answered", "failed", "retries", "429s", "in flight", "sent/s"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for run in list(session.runs):
        for stats in run.stats.values():
            table.add_row(
                stats.name,
                fmt(stats.rate),
                fmt(stats.rate_now or stats.rate),
                f"{stats.done + stats.skipped}/{stats.total}",
                str(stats.answered),
                str(stats.failed),
                str(stats.retries),
                str(stats.rate_limited),
                str(stats.in_flight),
                f"{stats.sent / max(stats.elapsed, 1e-9):.1f}",
            )
    return table


def _progress_line(session: Session) -> str:
    parts = []
    for run in list(session.runs):
        for s in run.stats.values():
            parts.append(
                f"{s.name}: {s.done + s.skipped}/{s.total} done, {s.failed} failed, {s.retries} retries, "
                f"{s.rate_limited} rate-limited, rate {s.rate_now or s.rate:.0f}/min"
            )
    return "; ".join(parts)


class _OneLinkPerRun(logging.Filter):
    """Prefect logs "View at <flow run URL>" twice for each flow run (when it creates the
    run, and again when the run begins); the second copy tells nothing new."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("View at "):
            return True
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


@contextmanager
def one_link_per_run() -> Iterator[None]:
    """While open, each flow run's UI link is logged once."""
    link_filter = _OneLinkPerRun()
    loggers = [logging.getLogger(name) for name in ("prefect.engine", "prefect.flow_runs")]
    for logger in loggers:
        logger.addFilter(link_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(link_filter)


@contextmanager
def _log_handlers_print_to(console: Console) -> Iterator[None]:
    """Point every logging handler that prints through a rich Console (Prefect's console
    handler) at `console`, so that while it shows a Live display, log lines go above the
    display instead of painting over it (which leaves stale copies of the table)."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    swapped: list[tuple[Any, Console]] = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(getattr(handler, "console", None), Console) and handler.console is not console:
                swapped.append((handler, handler.console))
                handler.console = console
    try:
        yield
    finally:
        for handler, original in swapped:
            handler.console = original


async def show_progress(
    console: Console, session: Session, interval: float | None = None, render: Callable[[], RenderableType] | None = None
) -> None:
    """Live table on a terminal, with log lines printed above it; a plain line every 10 s
    otherwise (CI, logs). Cancel to stop; the table then disappears, leaving the log lines."""
    render = render or (lambda: _progress_table(session))
    if console.is_terminal:
        with _log_handlers_print_to(console), Live(render(), console=console, refresh_per_second=4, transient=True) as live:
            while True:
                await asyncio.sleep(interval or 0.25)
                live.update(render())
    last = time.monotonic()
    while True:
        await asyncio.sleep(interval or 10)
        if line := _progress_line(session):
            print(f"[progress {time.monotonic() - last:.0f}s] {line}", file=sys.stderr, flush=True)


def print_study(study: Study, console: Console) -> None:
    """What the chained steps made: rephrase runs, the judge run and the study table."""
    if study.rephrase and study.rephrase.rephrase_run:
        console.print(headline(study.rephrase.rephrase_run))
    if judged := study.judge:
        made = judged.judge_file
        skipped = f" ({made.skipped_failed} failed prompt(s) not judged)" if made.skipped_failed else ""
        console.print(f"judge file: {made.file}: {made.records} prompt(s){skipped}", soft_wrap=True, highlight=False)
        console.print(headline(judged.judge_run))
        if judged.study is None:  # stopped before every verdict landed
            return
        table_rows = judged.study.summary
        if table_rows:
            table = Table(title="verdicts per model and judge", title_justify="left")
            columns = list(table_rows[0])
            for column in columns:
                table.add_column(column)
            for row in table_rows:
                table.add_row(*(fmt(row.get(c)) for c in columns))
            console.print(table)
        console.print(f"  study     {judged.study.parquet}\n  study     {judged.study.csv}", soft_wrap=True, highlight=False)
        if judged.report:
            console.print(f"  report    {judged.report}", soft_wrap=True, highlight=False)
