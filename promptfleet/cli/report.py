"""`promptfleet report`: the offline HTML report of a run or a study, again, from its table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from promptfleet.cli.options import Debug, err, fail
from promptfleet.cli.root import app


@app.command()
def report(
    table: Annotated[Path, typer.Argument(help="A results table (<stamp>-results-<name>.parquet) or a study table (<stamp>-study-<name>.parquet).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The page to write (default: beside the table, <stamp>-report-<name>.html; a study's <stamp>-study-report-<name>.html).")] = None,
    _debug: Debug = False,
) -> None:
    """Write the offline HTML report (scores with 95% intervals, charts, answers side by side)
    of a run's results table or a study's table; it opens from disk with no network."""
    from promptfleet.evaluation.report import parts_of

    if not table.is_file():
        fail(f"{table}: file not found" if not table.exists() else f"{table}: not a file")
    try:
        stamp, kind, name = parts_of(table)
    except ValueError as error:
        fail(str(error))
    if output is not None and not output.parent.is_dir():
        fail(f"{output}: its folder does not exist")
    study = table.with_name(f"{stamp}-study-{name}.parquet")
    if kind == "run" and study.exists():
        err.print(f"note: {study.name} is beside it; report that one to see the judges' verdicts", markup=False, highlight=False)
    written = _write(table, output)
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"wrote {written.html}")
    if written.charts is None:
        from promptfleet.evaluation.charts import INSTALL_HINT

        err.print(f"no charts: {INSTALL_HINT}", markup=False, highlight=False)


def _write(table: Path, output: Path | None):
    import polars as pl

    from promptfleet.evaluation.html import write_report

    try:
        return write_report(table, out=output)
    except (pl.exceptions.PolarsError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        fail(f"{table}: cannot read it as a promptfleet table ({first})")
    except OSError as error:
        fail(f"{output or table.parent}: cannot write the report there ({error.strerror or error})")
