"""The terminal while a run is live: log lines above the progress table, one table, no
stale copies. rich writes real escape sequences into a buffer; pyte plays them on a
virtual screen, so the assertions are about what a person would see."""

from __future__ import annotations

import asyncio
import io
import logging

import pyte
from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console
from rich.table import Table

from promptfleet.cli.console import show_progress
from promptfleet.core.session import Session

WIDTH, HEIGHT = 80, 30


def screen_of(raw: str) -> list[str]:
    screen = pyte.Screen(WIDTH, HEIGHT)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n"))
    return [line.rstrip() for line in screen.display]


def table(tick: list[int]) -> Table:
    tick[0] += 1
    t = Table(title="progress", title_justify="left")
    t.add_column("queue")
    t.add_column("done")
    t.add_row("q", f"{tick[0]}/100")
    return t


async def test_log_lines_print_above_one_live_table_and_leave_no_copies():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=WIDTH, height=HEIGHT, color_system=None)
    # Prefect's console handler as Prefect sets it up: its own Console on the same terminal
    handler = PrefectConsoleHandler(stream=out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("promptfleet.test-console")
    logger.addHandler(handler)
    logger.propagate = False
    original_console = handler.console
    tick = [0]
    progress = asyncio.create_task(show_progress(console, Session(), interval=0.01, render=lambda: table(tick)))
    try:
        for n in range(1, 4):
            await asyncio.sleep(0.05)
            logger.warning("retry %d of capital-%d after a 429", n, n)
        await asyncio.sleep(0.05)
        during = screen_of(out.getvalue())
    finally:
        progress.cancel()
        await asyncio.wait([progress])
        logger.removeHandler(handler)
    after = screen_of(out.getvalue())

    assert tick[0] > 5  # the table was redrawn many times while the logs came in
    lines = [line for line in during if line]
    logs = [i for i, line in enumerate(lines) if line.startswith("retry ")]
    titles = [i for i, line in enumerate(lines) if line.startswith("progress")]
    assert [lines[i] for i in logs] == [f"retry {n} of capital-{n} after a 429" for n in (1, 2, 3)]
    assert len(titles) == 1 and titles[0] > logs[-1]  # one table, below every log line
    assert sum("/100" in line for line in lines) == 1  # no stale copy of a row
    # afterwards the table is gone, the log lines stay, and the handler prints where it did
    assert [line for line in after if line] == [f"retry {n} of capital-{n} after a 429" for n in (1, 2, 3)]
    assert handler.console is original_console


async def test_without_a_terminal_progress_is_plain_lines(capsys):
    console = Console(file=io.StringIO(), force_terminal=False)
    progress = asyncio.create_task(show_progress(console, Session(), interval=0.01, render=lambda: table([0])))
    await asyncio.sleep(0.05)
    progress.cancel()
    await asyncio.wait([progress])
    assert "\x1b[" not in console.file.getvalue()  # no escape sequences into a pipe


def test_each_flow_run_link_is_shown_once():
    """Prefect logs "View at <link>" when it creates a flow run and again when the run
    begins; while the CLI runs a flow, the second copy is dropped and nothing else is."""
    from promptfleet.cli.console import one_link_per_run

    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(f"{record.name}: {record.getMessage()}")  # type: ignore[method-assign]

    def log(name: str, message: str) -> None:
        record = logging.LogRecord(name, logging.INFO, __file__, 0, message, None, None)
        record.send_to_api = False  # as Prefect logs the link: for the terminal only
        logging.getLogger(name).handle(record)

    logging.getLogger("prefect").addHandler(handler)
    try:
        with one_link_per_run():
            log("prefect.engine", "View at http://127.0.0.1:4200/runs/flow-run/a")
            log("prefect.flow_runs", "Beginning flow run 'exp' for flow 'run_experiment'")
            log("prefect.flow_runs", "View at http://127.0.0.1:4200/runs/flow-run/a")
            log("prefect.flow_runs", "View at http://127.0.0.1:4200/runs/flow-run/b")  # a subflow: its own link
        log("prefect.flow_runs", "View at http://127.0.0.1:4200/runs/flow-run/a")  # outside the CLI's flow: as Prefect has it
    finally:
        logging.getLogger("prefect").removeHandler(handler)
    assert shown == [
        "prefect.engine: View at http://127.0.0.1:4200/runs/flow-run/a",
        "prefect.flow_runs: Beginning flow run 'exp' for flow 'run_experiment'",
        "prefect.flow_runs: View at http://127.0.0.1:4200/runs/flow-run/b",
        "prefect.flow_runs: View at http://127.0.0.1:4200/runs/flow-run/a",
    ]
