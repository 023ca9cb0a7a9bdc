"""`promptfleet run`: one experiment file, as the flow `run_experiment` (or `run_study`)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from promptfleet.cli.check import print_inspection
from promptfleet.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_WRITE_FAILED,
    Batch,
    CreateDataFolder,
    DataFolder,
    Debug,
    EnvFile,
    Ephemeral,
    File,
    Grace,
    MaxAttempts,
    MaxQueries,
    MaxQueriesJson,
    MoveToInput,
    Parallel,
    Prices,
    RateShare,
    check_scorers,
    err,
    fail,
    load_env,
    make_settings,
    missing_env_lines,
    report_issues,
    require_data_folder,
    require_writable,
    split_list,
    stopped_with,
    this_command,
    write_failures_in_one_line,
)
from promptfleet.cli.prefect_api import prefect_api
from promptfleet.cli.root import app
from promptfleet.core.experiment import ExperimentError


@app.command()
def run(
    ctx: typer.Context,
    file: File,
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
    move_to_input: MoveToInput = False,
    max_queries: MaxQueries = None,
    max_attempts: MaxAttempts = 5,
    parallel: Parallel = False,
    max_queries_json: MaxQueriesJson = None,
    output_as_csv: Annotated[bool, typer.Option("--output-as-csv", help="Also write the results as CSV.")] = False,
    max_in_flight: Annotated[int, typer.Option(min=1, help="Cap on requests in flight per queue.")] = 512,
    timeout: Annotated[float, typer.Option(help="Seconds before a request times out.")] = 120.0,
    max_cost: Annotated[Optional[float], typer.Option(help="Stop sending when the estimated cost (USD) reaches this.")] = None,
    max_tokens_total: Annotated[Optional[int], typer.Option(help="Stop sending when this many tokens were used.")] = None,
    prices: Prices = None,
    rate_share: RateShare = 1.0,
    grace: Grace = None,
    scorers: Annotated[Optional[str], typer.Option("--scorer", "-s", "--scorers", help="Comma-separated scorers: match, includes, an entry point or module:function.")] = None,
    judge_folder: Annotated[Optional[Path], typer.Option("--judge-folder", "-l", "-jf", help="Judge folder (settings.json + templates).")] = None,
    judge_templates: Annotated[str, typer.Option("--judge-templates", "-jt", "--templates", "-t", help="Comma-separated template files.")] = "template.txt",
    judge: Annotated[Optional[str], typer.Option("--judge", "-j", help="Comma-separated judge ids from settings.json.")] = None,
    rephrase_folder: Annotated[Optional[Path], typer.Option("--rephrase-folder", "-rf", help="Rephrase folder (settings.json + templates).")] = None,
    rephrase_templates: Annotated[str, typer.Option("--rephrase-templates", "-rt", help="Comma-separated template files.")] = "template.txt",
    rephrase_model: Annotated[Optional[str], typer.Option("--rephrase-model", "-r", help="Comma-separated rephrase model ids.")] = None,
    rephrase_parser: Annotated[str, typer.Option("--rephrase-parser", "-rp", help="'default' (strip quotes and space).")] = "default",
    remove_original: Annotated[bool, typer.Option("--remove-original", "-ro", help="Run only the rephrased prompts.")] = False,
    only_rephrase: Annotated[bool, typer.Option("--only-rephrase", "-or", help="Stop after the rephrase experiment.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="If another process is running this experiment, wait for it instead of refusing.")] = False,
    batch: Batch = False,
    detach: Annotated[bool, typer.Option("--detach", help="With --batch: submit (and collect what has ended), then return.")] = False,
    batch_poll: Annotated[float, typer.Option("--batch-poll", min=0.01, help="Longest wait between polls of live batches, seconds.")] = 60.0,
    batch_fallback: Annotated[str, typer.Option("--batch-fallback", help="Where a retryable failed batch line goes next: batch or online.")] = "batch",
    batch_max_requests: Annotated[Optional[int], typer.Option("--batch-max-requests", min=1, help="Fewer requests per batch than the provider allows.")] = None,
    create_data_folder: CreateDataFolder = False,
    ephemeral: Ephemeral = False,
    _debug: Debug = False,
) -> None:
    """Run an experiment file as the Prefect flow `run_experiment`; re-run to resume.
    With --judge-folder/--judge or --rephrase-*, the evaluation is chained (flow `run_study`)."""
    load_env(env_file)
    from promptfleet.core.plan_cache import plan_for

    settings = make_settings(
        data_folder=data_folder,
        max_queries=max_queries,
        max_attempts=max_attempts,
        parallel=parallel,
        max_queries_json=max_queries_json,
        output_as_csv=output_as_csv,
        max_in_flight=max_in_flight,
        timeout=timeout,
        max_cost=max_cost,
        max_tokens_total=max_tokens_total,
        prices=prices,
        rate_share=rate_share,
        grace=grace,
        scorers=split_list(scorers),
        batch=batch,
        batch_detach=detach,
        batch_poll=batch_poll,
        batch_fallback=batch_fallback,
        batch_max_requests=batch_max_requests,
    )
    if (detach or batch_fallback != "batch") and not batch or batch_fallback not in ("batch", "online"):
        err.print("--detach and --batch-fallback go with --batch; --batch-fallback is 'batch' or 'online'")
        raise typer.Exit(EXIT_BAD_INPUT)
    if bool(judge_folder) != bool(judge) or bool(rephrase_folder) != bool(rephrase_model):
        fail("--judge-folder needs --judge, and --rephrase-folder needs --rephrase-model (and the other way round)")
    if rephrase_parser != "default":
        fail("only the 'default' rephrase parser is built in")
    require_data_folder(data_folder, create_data_folder)
    check_scorers(settings.scorers)
    try:  # refuse a bad file in a second, before Prefect starts
        found = plan_for(file, settings)
    except ExperimentError as error:
        report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if found.issue_count:
        print_inspection(found)
        raise typer.Exit(EXIT_BAD_INPUT)
    require_writable(settings.output_folder / found.name, 0 if move_to_input else found.size)
    if judge_folder or rephrase_folder:
        from promptfleet.evaluation import judge as judging

        try:  # a bad judge or rephrase folder is refused before anything is sent
            if judge_folder:
                judging.load_judge_folder(judge_folder, split_list(judge_templates), split_list(judge))
            if rephrase_folder:
                judging.load_rephrase_folder(rephrase_folder, split_list(rephrase_templates), split_list(rephrase_model))
        except ExperimentError as error:
            report_issues(error)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    from promptfleet.core import inbox
    from promptfleet.core.session import Session

    session = Session()
    try:  # the one claim (an inbox file leaves the inbox, as a poll takes it), before Prefect starts
        work = inbox.take(file, settings, session, wait,
                          on_wait=lambda owner: err.print(f"{found.name} is being run by {owner}; waiting for it", markup=False))  # fmt: skip
    except inbox.Taken as taken:
        hint = " (use --wait to wait for it)" if taken.running else ""
        err.print(f"cannot run {taken.name}: {taken.reason}{hint}", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if work.claim:
        ctx.call_on_close(work.claim.end)  # however the command ends
        file, move_to_input = work.file, True
        found = dataclasses.replace(found, file=work.file)
    session.remember_plan(found)

    async def start():
        from promptfleet.orchestration.flows.outcome import result_of

        if judge_folder or rephrase_folder:
            from promptfleet.orchestration.flows.evaluate import run_study

            return await result_of(
                run_study, file=str(file), settings=settings, move_to_input=move_to_input,
                judge_folder=str(judge_folder) if judge_folder else None, judges=split_list(judge),
                judge_templates=split_list(judge_templates), rephrase_folder=str(rephrase_folder) if rephrase_folder else None,
                rephrase_models=split_list(rephrase_model), rephrase_templates=split_list(rephrase_templates),
                remove_original=remove_original, only_rephrase=only_rephrase,
            )  # fmt: skip
        from promptfleet.orchestration.flows.run_experiment import run_experiment

        return await result_of(run_experiment, file=str(file), settings=settings, move_to_input=move_to_input, wait=wait)

    with prefect_api(ephemeral):
        if found.missing_env:  # keys may still come from Prefect Secret blocks, as in the flow
            from promptfleet.orchestration.secrets import env_from_secret_blocks

            filled = asyncio.run(env_from_secret_blocks(name for names in found.missing_env.values() for name in names))
            if lines := missing_env_lines(found, set(filled), "not set in the environment, the .env file or a Prefect Secret block"):
                work.settle(False, None, settings.input_folder)
                fail("\n".join(lines))
            session.remember_plan(dataclasses.replace(found, missing_env={}))  # every key is set now
        settings.input_folder.mkdir(exist_ok=True)  # a fresh clone's inbox, once the run is sure to start
        try:
            with write_failures_in_one_line():
                result = asyncio.run(in_flow(start, session))
        except ExperimentError as error:
            report_issues(error)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as error:  # e.g. the run's state file on a full disk, before anything is sent
            err.print(f"cannot write: {error}; nothing was sent. Free space, then run the same command again.", markup=False, highlight=False)
            raise typer.Exit(EXIT_WRITE_FAILED) from None
    if result is None:
        raise typer.Exit(EXIT_INTERRUPTED)
    from promptfleet.cli.console import print_study, print_summary
    from promptfleet.evaluation.outcomes import Study

    summary = result.run if isinstance(result, Study) else result
    if summary is None:  # the rephrasing was another process's: it said so in the log
        fail(f"{found.name}: the rephrasing is being run by another process; nothing was run here")
    console = Console(width=max(Console().width, 120))
    print_summary(summary, console)
    if isinstance(result, Study):
        print_study(result, console)
        if result.judge and not result.judge.judge_run.complete:
            stopped_with(result.judge.judge_run.unfinished, "judge prompt(s)")
    if not summary.complete:
        if summary.journal_error:
            err.print(
                f"{summary.journal_error}. Stopped sending: {summary.unsaved} answer(s) that landed could not be saved "
                "and will be asked again. Free space, then resume with: " + this_command(),
                markup=False, highlight=False,
            )  # fmt: skip
            raise typer.Exit(EXIT_WRITE_FAILED)
        if summary.stopped_by:
            err.print(f"stopped: {summary.stopped_by}", markup=False, highlight=False)
        if summary.live_batches and detach:
            err.print(f"{summary.unfinished} prompt(s) in {summary.live_batches} live batch(es); "
                      "to collect them, run the same command again (or see `promptfleet batches list`):")  # fmt: skip
            err.print("  " + this_command(), markup=False, highlight=False)
            return
        stopped_with(summary.unfinished)


async def in_flow(start: Callable[[], Awaitable[Any]], session: Any = None) -> Any:
    """Run a flow with Ctrl-C/SIGTERM meaning 'stop sending, keep what landed' and a
    live progress display; None when a second interrupt abandoned it."""
    from promptfleet.cli.console import one_link_per_run, show_progress
    from promptfleet.core.session import Session, using
    from promptfleet.core.signals import stop_on_signals

    session = session or Session()
    stop_on_signals(session)
    progress = asyncio.create_task(show_progress(err, session))
    try:
        with using(session), one_link_per_run():
            return await start()
    except asyncio.CancelledError:
        return None
    finally:
        progress.cancel()
        await asyncio.wait([progress])  # the live table is gone before anything else prints


