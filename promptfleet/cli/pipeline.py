"""`promptfleet pipeline`: prompto's pipeline, polling the input folder as the flow `watch_input`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from promptfleet.cli.options import (
    EXIT_INTERRUPTED,
    EXIT_WRITE_FAILED,
    CreateDataFolder,
    DataFolder,
    Debug,
    EnvFile,
    Ephemeral,
    Grace,
    MaxAttempts,
    MaxQueries,
    MaxQueriesJson,
    Parallel,
    err,
    load_env,
    make_settings,
    require_data_folder,
    this_command,
)
from promptfleet.cli.prefect_api import prefect_api
from promptfleet.cli.root import app
from promptfleet.cli.run import in_flow


@app.command()
def pipeline(
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
    max_queries: MaxQueries = None,
    max_attempts: MaxAttempts = 5,
    parallel: Parallel = False,
    max_queries_json: MaxQueriesJson = None,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.1, help="Seconds between looks at input/.")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Process what is waiting, then exit.")] = False,
    settle: Annotated[float, typer.Option("--settle", min=0, help="Seconds a file must be left unwritten before it is claimed.")] = 10.0,
    lease: Annotated[float, typer.Option("--lease", min=1, envvar="PROMPTFLEET_LEASE_SECONDS",
                     help="Seconds a claim lives unrenewed before any host puts it back (docs/guarantees.md).")] = 60.0,
    batch: Annotated[bool, typer.Option("--batch", help="Batch mode; each poll submits and collects, never waits for a batch.")] = False,
    grace: Grace = None,
    create_data_folder: CreateDataFolder = False,
    ephemeral: Ephemeral = False,
    _debug: Debug = False,
) -> None:
    """Keep running every experiment dropped into DATA/input/ (prompto's pipeline), as the
    Prefect flow `watch_input`; bad files go to DATA/rejected/ with their error report."""
    load_env(env_file)
    require_data_folder(data_folder, create_data_folder)
    from promptfleet.core import inbox
    from promptfleet.core.session import current_session
    from promptfleet.orchestration.flows.watch_input import watch_input

    settings = make_settings(
        data_folder=data_folder, max_queries=max_queries, max_attempts=max_attempts,
        parallel=parallel, max_queries_json=max_queries_json, settle_seconds=settle, batch=batch, batch_detach=batch,
        lease_seconds=lease,
        grace=grace,
    )  # fmt: skip
    settings.input_folder.mkdir(parents=True, exist_ok=True)
    failure: list[str] = []

    async def loop() -> tuple[int, bool]:
        stop = current_session().stop
        runs = 0
        while not stop.is_set():
            if (
                inbox.waiting_files(settings.input_folder, settings.settle_seconds)
                or inbox.requeue_orphans(settings.input_folder, lease_seconds=lease)
                or inbox.requeue_stranded(settings.input_folder, settings.output_folder, lease_seconds=lease)
            ):
                for summary in await watch_input(settings=settings):
                    runs += 1
                    err.print(f"{summary.experiment}: {summary.answered} answered, {summary.failed} failed", markup=False)
                    if summary.journal_error:
                        failure.append(summary.journal_error)
            if once or failure:
                break
            try:  # sleep until the next poll, or until Ctrl-C
                await asyncio.wait_for(stop.wait(), timeout=poll_interval)
            except asyncio.TimeoutError:
                pass
        return runs, stop.is_set()

    err.print(f"watching {settings.input_folder} every {poll_interval:g}s (Ctrl-C to stop)" if not once else f"processing {settings.input_folder}")
    with prefect_api(ephemeral):
        outcome = asyncio.run(in_flow(loop))
    runs, stopped = outcome if outcome is not None else (0, True)
    resume = f"unfinished files are back in {settings.input_folder} and resume with: " + this_command()
    if failure:
        err.print(f"{failure[0]}: pipeline stopped; {resume}", markup=False, highlight=False)
        raise typer.Exit(EXIT_WRITE_FAILED)
    if stopped:
        err.print(f"pipeline stopped after {runs} run(s); {resume}", markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    err.print(f"pipeline stopped after {runs} run(s)")


