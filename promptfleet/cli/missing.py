"""`promptfleet missing`: prompto's `prompto_obtain_missing_jsonl`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from promptfleet.cli.options import EXIT_BAD_INPUT, err, report_issues
from promptfleet.cli.root import app
from promptfleet.core.experiment import ExperimentError


@app.command()
def missing(
    experiment: Annotated[Path, typer.Option("--input", "-i", help="The experiment file that was run.")],
    completed: Annotated[Path, typer.Option("--output", "-o", help="Its completed file (answers).")],
    new: Annotated[Path, typer.Option("--new", "-n", help="Experiment file to write with the unanswered records.")],
    id_key: Annotated[Optional[str], typer.Option("--id", help="Key matching input and answers [default: id; the input line when records have none].")] = None,
) -> None:
    """Write the input records that have no answer in a completed file, as a runnable
    experiment file (prompto_obtain_missing_jsonl)."""
    from promptfleet.evaluation.missing import write_missing

    try:
        found = write_missing(experiment, completed, new, id_key)
    except ExperimentError as error:
        report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    out = Console(soft_wrap=True)
    if found.unreadable_answers:
        err.print(f"{completed}: {found.unreadable_answers} unreadable line(s) ignored (their prompts count as missing)", markup=False, highlight=False)
    if found.missing:
        out.print(f"{found.missing} of {found.total} prompt(s) have no answer; wrote {new}", highlight=False)
    else:
        out.print(f"no missing prompts: all {found.total} have an answer ({new} not written)", highlight=False)


