"""`promptfleet batches list|cancel`: the provider batches of a data folder's runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from promptfleet.cli.options import EXIT_BAD_INPUT, DataFolder, EnvFile, err, load_env
from promptfleet.cli.root import group

batches_app = group("batches", "The provider batches of a data folder's runs (batch mode).")


@batches_app.command("list")
def batches_list(
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
    offline: Annotated[bool, typer.Option("--offline", help="Only what the journals say; do not ask the providers.")] = False,
) -> None:
    """Every batch the runs under DATA/output/ submitted: its state as last read (the live ones
    are asked now), its age and its cost (the worst case at batch prices until collected)."""
    load_env(env_file)
    from promptfleet.batch.admin import age_text, list_batches

    rows = asyncio.run(list_batches(data_folder, ask=not offline))
    from rich.table import Table

    table = Table("experiment", "run", "batch", "api/model", "prompts", "state", "age", "cost (USD)")
    for row in rows:
        table.add_row(row.experiment, row.stamp, row.batch_id, f"{row.api}/{row.model}", str(row.prompts), row.state,
                      age_text(row.age), row.cost)  # fmt: skip
    Console(width=max(Console().width, 160)).print(table if rows else f"no batches under {data_folder / 'output'}")


@batches_app.command("cancel")
def batches_cancel(
    batch_ids: Annotated[Optional[list[str]], typer.Argument(help="Batch ids to cancel [default: every live one].")] = None,
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
) -> None:
    """Cancel live batches (all, or the ids given); the next run of each experiment collects
    their finished lines and writes the cancelled ones to the failed file."""
    load_env(env_file)
    from promptfleet.batch.admin import cancel_batches

    done, problems = asyncio.run(cancel_batches(data_folder, batch_ids or None))
    for batch_id in done:
        Console(soft_wrap=True).print(f"cancelling {batch_id}", highlight=False)
    for problem in problems:
        err.print(problem, markup=False, highlight=False)
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)


