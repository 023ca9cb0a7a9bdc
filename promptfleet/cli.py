"""`promptfleet` command line: prompto's flags, Prefect underneath."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from promptfleet.experiment import ExperimentError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True, soft_wrap=True)  # never wrap a file:line message

EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130
EXIT_WRITE_FAILED = 74  # sysexits EX_IOERR: the disk refused a write
DEBUG_ENV = "PROMPTFLEET_DEBUG"


def _set_debug(value: bool) -> None:
    if value:
        os.environ[DEBUG_ENV] = "1"


Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.", callback=_set_debug, expose_value=False)]

File = Annotated[Path, typer.Option("--file", "-f", help="Experiment file (.jsonl or .csv).")]
DataFolder = Annotated[Path, typer.Option("--data-folder", "-d", help="Folder with input/, output/, media/.")]
EnvFile = Annotated[Path, typer.Option("--env-file", "-e", help="Env file with API keys (prompto's .env).")]
MoveToInput = Annotated[bool, typer.Option("--move-to-input", "-m", help="Move the file into input/ instead of copying it.")]
MaxQueries = Annotated[
    Optional[int],
    typer.Option("--max-queries", "-mq", min=1, help="Default queries per minute per queue [default: 10; test api: 600]."),
]
MaxAttempts = Annotated[int, typer.Option("--max-attempts", "-ma", min=1, help="Attempts per prompt before it fails.")]
Parallel = Annotated[bool, typer.Option("--parallel", "-p", help="One queue per group/api (and model), run in parallel.")]
MaxQueriesJson = Annotated[
    Optional[Path], typer.Option("--max-queries-json", "-mqj", help="JSON of rate limits per api/group/model.")
]
Prices = Annotated[Optional[Path], typer.Option("--prices", help="JSON of USD per million tokens per model (extends ours).")]
Batch = Annotated[bool, typer.Option("--batch", help="Send what the providers' batch APIs take through them, at batch prices.")]
Grace = Annotated[
    Optional[float],
    typer.Option("--grace", min=0, help="Seconds in-flight answers get to land after Ctrl-C/SIGTERM [default: the request timeout]."),
]
Ephemeral = Annotated[
    bool,
    typer.Option(
        "--ephemeral",
        help="Use a temporary Prefect server for this command only (also: PROMPTFLEET_EPHEMERAL=1), "
        "instead of the background one. PREFECT_API_URL, when set, always wins.",
    ),
]
CreateDataFolder = Annotated[bool, typer.Option("--create-data-folder", help="Create the data folder if it does not exist.")]
RateShare = Annotated[
    float, typer.Option("--rate-share", min=0.01, max=1.0, help="Use this fraction of every rate (with a Prefect server: of the key's shared rate).")
]


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _load_env(env_file: Path) -> None:
    """Read the .env file and route our log lines to Prefect before Prefect is imported."""
    from dotenv import load_dotenv

    if env_file.exists():
        load_dotenv(env_file, override=False)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "promptfleet")
    # Offline by design: the temporary server's telemetry only fails noisily here.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _settings(**values: Any):
    from promptfleet.config import Settings

    return Settings(**values)


def _data_folder(folder: Path, create: bool) -> None:
    """Refuse a data folder that does not exist (prompto does too): a typo must not scatter
    input/ and output/ folders around; --create-data-folder makes it."""
    if folder.is_dir():
        return
    if folder.exists():
        _fail(f"{folder}: the data folder is a file, not a folder")
    if not create:
        _fail(f"{folder}: data folder not found (check -d, or add --create-data-folder to create it)")
    folder.mkdir(parents=True)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err.print(message, markup=False, highlight=False)
    raise typer.Exit(code)


def _check_scorers(names: list[str]) -> None:
    """Import every scorer before anything starts, so a typo costs a second, not a run."""
    from promptfleet.scorers import scorer_problem

    for name in names:
        if problem := scorer_problem(name):
            _fail(f"--scorer {name}: {problem}")


@contextmanager
def _prefect_api(ephemeral: bool) -> Iterator[str]:
    """The Prefect API for this command: the one the user configured, else the background
    server (started by the first command), else with --ephemeral a temporary one."""
    from promptfleet import server

    if configured := server.configured_api_url():
        yield configured
        return
    home = server.prefect_home()
    if server.ephemeral_requested(ephemeral):
        err.print("starting a temporary Prefect server (~15 s; it stops with this command)")
        try:
            with server.temporary(home) as info, _api_url(info.api_url, server.plain_http_env(home)):
                yield info.api_url
        except server.ServerError as error:
            _fail(f"cannot start the Prefect server: {error}")
        return
    from promptfleet.flows.crashed_runs import heartbeat_env

    info = _background_server(home)
    # heartbeats: a run killed with -9 is marked Crashed, not Running forever
    with _api_url(info.api_url, {**heartbeat_env(), **server.plain_http_env(home)}):
        yield info.api_url


def _background_server(home: Path, port: int | None = None):
    """The background server, started if needed (with the automation that marks runs of
    killed processes Crashed); a failure to start is one line."""
    from promptfleet import server
    from promptfleet.flows.crashed_runs import ensure_crash_automation

    try:
        info, started = server.start(home, port, announce=lambda line: err.print(line, markup=False, highlight=False))
    except server.ServerError as error:
        _fail(f"cannot start the Prefect server: {error}")
    if started:
        with _api_url(info.api_url):
            asyncio.run(ensure_crash_automation())
    return info


@contextmanager
def _api_url(url: str, extra_env: dict[str, str] | None = None) -> Iterator[None]:
    """Point Prefect at `url` for the rest of this process (its threads included), then back."""
    import prefect.context

    changes = {"PREFECT_API_URL": url, **(extra_env or {})}
    saved_env, saved_context = {name: os.environ.get(name) for name in changes}, prefect.context.GLOBAL_SETTINGS_CONTEXT
    os.environ.update(changes)
    prefect.context.refresh_global_settings_context()
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        prefect.context.GLOBAL_SETTINGS_CONTEXT = saved_context  # as it was, without re-reading every source


def _missing_env_lines(found, present: set[str], where_hint: str) -> list[str]:
    lines = []
    for where, names in found.missing_env.items():
        if missing := [name for name in names if name not in present]:
            lines.append(f"{found.file}: env: {where} needs {', '.join(missing)} ({where_hint})")
    return lines


def _report_issues(error: ExperimentError) -> None:
    if len(error.issues) == 1:
        err.print(f"cannot run: {error.issues[0]}", markup=False, highlight=False)
        return
    err.print(f"[red]cannot run: {len(error.issues)} problem(s)[/red]")
    for issue in error.issues:
        err.print(f"  {issue}", markup=False, highlight=False)


@app.command()
def run(
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
    _load_env(env_file)
    from promptfleet.plan import inspect

    settings = _settings(
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
        scorers=_split(scorers),
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
        _fail("--judge-folder needs --judge, and --rephrase-folder needs --rephrase-model (and the other way round)")
    if rephrase_parser != "default":
        _fail("only the 'default' rephrase parser is built in")
    _data_folder(data_folder, create_data_folder)
    _check_scorers(settings.scorers)
    try:  # refuse a bad file in a second, before Prefect starts
        found = inspect(file, settings)
    except ExperimentError as error:
        _report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if found.issue_count:
        _print_inspection(found)
        raise typer.Exit(EXIT_BAD_INPUT)
    if judge_folder or rephrase_folder:
        from promptfleet import judge as judging

        try:  # a bad judge or rephrase folder is refused before anything is sent
            if judge_folder:
                judging.load_judge_folder(judge_folder, _split(judge_templates), _split(judge))
            if rephrase_folder:
                judging.load_rephrase_folder(rephrase_folder, _split(rephrase_templates), _split(rephrase_model))
        except ExperimentError as error:
            _report_issues(error)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    from promptfleet import inbox
    from promptfleet.session import Session

    session = Session()
    claimed = None
    if file.resolve().parent == settings.input_folder.resolve():  # an inbox file: claimed, like the pipeline does
        claimed = inbox.claim(file, settings.lease_seconds)
        if claimed is None:
            err.print(f"{file}: another process has just claimed it")
            raise typer.Exit(EXIT_BAD_INPUT)
        claimed.holder.start()
        typer.get_current_context().call_on_close(claimed.end)  # however the command ends
        session.hold(claimed)
        file, move_to_input = claimed.path, True
        found = dataclasses.replace(found, file=claimed.path)
    session.remember_plan(found)
    from promptfleet.rundir import RunBusy

    try:  # one owner per experiment: refuse (or wait) before Prefect starts
        session.lock_for(settings.output_folder / found.name).acquire(
            wait, on_wait=lambda owner: err.print(f"{found.name} is being run by {owner}; waiting for it", markup=False)
        )
    except RunBusy as busy:
        err.print(f"cannot run {found.name}: it is being run by {busy} (use --wait to wait for it)", markup=False, highlight=False)
        if claimed:
            inbox.release(claimed)
        raise typer.Exit(EXIT_BAD_INPUT) from None

    def start():
        if judge_folder or rephrase_folder:
            from promptfleet.flows.evaluate import run_study

            return run_study(
                file=str(file), settings=settings, move_to_input=move_to_input,
                judge_folder=str(judge_folder) if judge_folder else None, judges=_split(judge),
                judge_templates=_split(judge_templates), rephrase_folder=str(rephrase_folder) if rephrase_folder else None,
                rephrase_models=_split(rephrase_model), rephrase_templates=_split(rephrase_templates),
                remove_original=remove_original, only_rephrase=only_rephrase,
            )  # fmt: skip
        from promptfleet.flows import run_experiment

        return run_experiment(file=str(file), settings=settings, move_to_input=move_to_input, wait=wait)

    with _prefect_api(ephemeral):
        if found.missing_env:  # keys may still come from Prefect Secret blocks, as in the flow
            from promptfleet.tasks.secrets import env_from_secret_blocks

            filled = asyncio.run(env_from_secret_blocks(name for names in found.missing_env.values() for name in names))
            if lines := _missing_env_lines(found, set(filled), "not set in the environment, the .env file or a Prefect Secret block"):
                if claimed:
                    inbox.release(claimed)
                _fail("\n".join(lines))
            session.remember_plan(dataclasses.replace(found, missing_env={}))  # every key is set now
        try:
            result = asyncio.run(_in_flow(start, session))
        except ExperimentError as error:
            _report_issues(error)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as error:  # e.g. the run's state file on a full disk, before anything is sent
            err.print(f"cannot write: {error}; nothing was sent. Free space, then run the same command again.", markup=False, highlight=False)
            raise typer.Exit(EXIT_WRITE_FAILED) from None
    if result is None:
        raise typer.Exit(EXIT_INTERRUPTED)
    from promptfleet.console import print_study, print_summary

    summary = result.get("run", result)

    console = Console(width=max(Console().width, 120))
    print_summary(summary, console)
    if "run" in result:
        print_study(result, console)
    if not summary["complete"]:
        if claimed and (working_copy := Path(summary["outputs"].get("input", file))).exists():
            inbox.give_back_claimed(claimed, working_copy, settings.input_folder)
        if summary.get("journal_error"):
            err.print(
                f"{summary['journal_error']}. Stopped sending: {summary['unsaved']} answer(s) that landed could not be saved "
                "and will be asked again. Free space, then resume with: " + shlex.join(["promptfleet", *sys.argv[1:]]),
                markup=False, highlight=False,
            )  # fmt: skip
            raise typer.Exit(EXIT_WRITE_FAILED)
        if summary.get("stopped_by"):
            err.print(f"stopped: {summary['stopped_by']}", markup=False, highlight=False)
        if summary.get("live_batches") and detach:
            err.print(f"{summary['unfinished']} prompt(s) in {summary['live_batches']} live batch(es); "
                      "to collect them, run the same command again (or see `promptfleet batches list`):")  # fmt: skip
            err.print("  " + shlex.join(["promptfleet", *sys.argv[1:]]), markup=False, highlight=False)
            return
        err.print(f"stopped with {summary['unfinished']} prompt(s) unfinished; to resume, run the same command again:")
        err.print("  " + shlex.join(["promptfleet", *sys.argv[1:]]), markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)


async def _in_flow(start: Callable[[], Awaitable[Any]], session: Any = None) -> Any:
    """Run a flow with Ctrl-C/SIGTERM meaning 'stop sending, keep what landed' and a
    live progress display; None when a second interrupt abandoned it."""
    from promptfleet.console import one_link_per_run, show_progress
    from promptfleet.session import Session, using
    from promptfleet.signals import stop_on_signals

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


def _print_inspection(found, batch: bool = False, env_lines: list[str] | None = None) -> None:
    out = Console(soft_wrap=True)
    for issue in found.issues:
        err.print(issue, markup=False, highlight=False)
    if found.issue_count > len(found.issues):
        err.print(f"... and {found.issue_count - len(found.issues)} more problems")
    for line in _missing_env_lines(found, set(), "not set") if env_lines is None else env_lines:
        err.print(line, markup=False, highlight=False)
    out.print(f"{found.file}: {found.prompts} valid prompt(s), {found.issue_count} bad line(s)")
    for queue in found.queues.values():
        tpm = f", {queue.tokens_per_minute:g} tokens/min" if queue.tokens_per_minute else ""
        out.print(f"  queue {queue.name}: {queue.prompts} prompt(s) at {queue.rate_per_minute:g}/min{tpm}")
    unpriced = f"; no price for {', '.join(found.unpriced_models)}" if found.unpriced_models else ""
    out.print(
        f"worst case: {found.worst_case_input_tokens} input + {found.worst_case_output_tokens} output tokens, "
        f"about ${found.worst_case_cost:.4f}{unpriced} (see --prices)"
    )
    if batch:
        out.print(
            f"with --batch: {found.batch_prompts} prompt(s) through batch APIs, the rest online; worst case about "
            f"${found.worst_case_cost_batch:.4f} instead of ${found.worst_case_cost:.4f} online"
        )


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
    _load_env(env_file)
    _data_folder(data_folder, create_data_folder)
    from promptfleet import inbox
    from promptfleet.flows import watch_input
    from promptfleet.session import current_session

    settings = _settings(
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
                    err.print(f"{summary['experiment']}: {summary['answered']} answered, {summary['failed']} failed", markup=False)
                    if summary.get("journal_error"):
                        failure.append(summary["journal_error"])
            if once or failure:
                break
            try:  # sleep until the next poll, or until Ctrl-C
                await asyncio.wait_for(stop.wait(), timeout=poll_interval)
            except asyncio.TimeoutError:
                pass
        return runs, stop.is_set()

    err.print(f"watching {settings.input_folder} every {poll_interval:g}s (Ctrl-C to stop)" if not once else f"processing {settings.input_folder}")
    with _prefect_api(ephemeral):
        outcome = asyncio.run(_in_flow(loop))
    runs, stopped = outcome if outcome is not None else (0, True)
    resume = f"unfinished files are back in {settings.input_folder} and resume with: " + shlex.join(["promptfleet", *sys.argv[1:]])
    if failure:
        err.print(f"{failure[0]}: pipeline stopped; {resume}", markup=False, highlight=False)
        raise typer.Exit(EXIT_WRITE_FAILED)
    if stopped:
        err.print(f"pipeline stopped after {runs} run(s); {resume}", markup=False, highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    err.print(f"pipeline stopped after {runs} run(s)")


@app.command()
def judge(
    input_file: Annotated[Path, typer.Option("--input-file", "-i", "--experiment-file", help="A completed file (<stamp>-completed-<name>.jsonl).")],
    judge_folder: Annotated[Path, typer.Option("--judge-folder", "-l", "-jf", help="Judge folder (settings.json + templates).")],
    judge: Annotated[str, typer.Option("--judge", "-j", help="Comma-separated judge ids from settings.json.")],
    judge_templates: Annotated[str, typer.Option("--judge-templates", "-jt", "--templates", "-t", help="Comma-separated template files.")] = "template.txt",
    output_folder: Annotated[Path, typer.Option("--output-folder", "-o", help="Folder to write judge-<input name>.jsonl in (prompto's).")] = Path("."),
    _debug: Debug = False,
) -> None:
    """Create a judge experiment file from a completed one (prompto_create_judge_file); run it with `promptfleet run`."""
    from promptfleet import judge as judging
    from promptfleet.flows.evaluate import run_paths_of

    if not input_file.is_file():
        _fail(f"{input_file}: file not found")
    completed = "-completed-" in input_file.name
    out = output_folder / judging.judge_file_name(input_file)
    failed = run_paths_of(input_file).failed if completed else None
    if output_folder.exists() and not output_folder.is_dir():
        err.print(f"{output_folder}: --output-folder is a file, not a folder", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:  # the folder is made only once the judge file can be written
        made = judging.write_judge_file(input_file, judge_folder, _split(judge_templates), _split(judge), out, failed)
    except ExperimentError as error:
        _report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except OSError as error:  # a missing parent, no permission, a name taken by a folder: say which path and why
        _fail(f"{out}: cannot write the judge file there ({error.strerror or error})")
    Console(soft_wrap=True).print(f"wrote {made['records']} judge prompt(s) to {out}", highlight=False)
    if made["skipped_failed"]:
        err.print(f"{made['skipped_failed']} failed prompt(s) not judged: {made['skipped_reason']}")


@app.command()
def missing(
    experiment: Annotated[Path, typer.Option("--input", "-i", help="The experiment file that was run.")],
    completed: Annotated[Path, typer.Option("--output", "-o", help="Its completed file (answers).")],
    new: Annotated[Path, typer.Option("--new", "-n", help="Experiment file to write with the unanswered records.")],
    id_key: Annotated[Optional[str], typer.Option("--id", help="Key matching input and answers [default: id; the input line when records have none].")] = None,
) -> None:
    """Write the input records that have no answer in a completed file, as a runnable
    experiment file (prompto_obtain_missing_jsonl)."""
    from promptfleet.missing import write_missing

    try:
        found = write_missing(experiment, completed, new, id_key)
    except ExperimentError as error:
        _report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    out = Console(soft_wrap=True)
    if found.unreadable_answers:
        err.print(f"{completed}: {found.unreadable_answers} unreadable line(s) ignored (their prompts count as missing)", markup=False, highlight=False)
    if found.missing:
        out.print(f"{found.missing} of {found.total} prompt(s) have no answer; wrote {new}", highlight=False)
    else:
        out.print(f"no missing prompts: all {found.total} have an answer ({new} not written)", highlight=False)


@app.command()
def check(
    file: File,
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
    max_queries: MaxQueries = None,
    parallel: Parallel = False,
    max_queries_json: MaxQueriesJson = None,
    move_to_input: MoveToInput = False,
    log_file: Annotated[Optional[Path], typer.Option("--log-file", "-l", help="Also write the report here.")] = None,
    prices: Prices = None,
    batch: Batch = False,
    _debug: Debug = False,
) -> None:
    """Validate an experiment file without sending anything: bad lines, queues, missing env
    vars (a Prefect Secret block counts as set), and the worst-case tokens and cost."""
    _load_env(env_file)
    from promptfleet.plan import inspect

    settings = _settings(
        data_folder=data_folder, max_queries=max_queries, parallel=parallel, max_queries_json=max_queries_json, prices=prices,
        batch=batch,
    )  # fmt: skip
    if move_to_input:
        _data_folder(data_folder, create=False)
    try:
        found = inspect(file, settings)
    except ExperimentError as error:
        _report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    env_lines = _env_lines_with_secret_blocks(found)
    _print_inspection(found, batch, env_lines)
    if log_file:
        log_file.write_text("".join(f"{line}\n" for line in [*found.issues, *env_lines]))
    if found.issue_count or env_lines:
        raise typer.Exit(EXIT_BAD_INPUT)
    if move_to_input:
        settings.input_folder.mkdir(parents=True, exist_ok=True)
        file.rename(settings.input_folder / file.name)
    Console().print("[green]ok[/green]")


upload_media = typer.Typer(no_args_is_help=True, help="Gemini File API uploads (prompto_upload_media), reused by content hash.")
app.add_typer(upload_media, name="upload-media")


def _gemini_client(env_file: Path):
    _load_env(env_file)
    if not os.environ.get("GEMINI_API_KEY"):
        err.print("GEMINI_API_KEY is not set (environment or --env-file)")
        raise typer.Exit(EXIT_BAD_INPUT)
    from promptfleet import gemini_files

    return gemini_files.client_for(os.environ)


def _gemini_call(work: Awaitable[Any]) -> Any:
    """Run a File API call; a refusal or a network failure is one line, never a key."""
    import httpx2
    from google.genai.errors import APIError

    from promptfleet.gemini_files import UploadFailed
    from promptfleet.providers import redact

    try:
        return asyncio.run(work)
    except ExperimentError as error:
        _report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (APIError, UploadFailed, TimeoutError, httpx2.HTTPError, OSError) as error:
        err.print(f"Gemini File API: {redact(str(error), (os.environ.get('GEMINI_API_KEY', ''),))}", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@upload_media.command("upload")
def upload_media_upload(
    file: File,
    media_folder: Annotated[Path, typer.Option("--media-folder", "-m", "--data-folder", "-d", help="Folder the media paths are relative to.")],
    output_file: Annotated[Optional[Path], typer.Option("--output-file", "-o", help="Experiment file to write [default: <file>_uploaded.jsonl].")] = None,
    overwrite_output: Annotated[bool, typer.Option("--overwrite-output", "-w", help="Replace the output file if it exists.")] = False,
    env_file: EnvFile = Path(".env"),
) -> None:
    """Upload the media of an experiment's gemini prompts once each, and write the
    experiment with each media part naming its upload (`uploaded_filename`)."""
    from promptfleet.media_upload import upload_experiment_media

    out = output_file or file.with_name(f"{file.stem}_uploaded.jsonl")
    if out.exists() and not overwrite_output:
        err.print(f"{out} exists; pass --overwrite-output (-w) to replace it, or choose --output-file", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    client = _gemini_client(env_file)
    report = _gemini_call(upload_experiment_media(client, file, media_folder, out))  # the output is written last
    Console(soft_wrap=True).print(
        f"{report.files} media file(s): {report.uploaded} uploaded, {report.reused} already there; wrote {out}", highlight=False
    )


@upload_media.command("list")
def upload_media_list(env_file: EnvFile = Path(".env")) -> None:
    """List the files this key has uploaded, with their SHA-256."""
    from promptfleet import gemini_files

    client = _gemini_client(env_file)
    found = _gemini_call(gemini_files.uploaded_by_hash(client))
    out = Console(soft_wrap=True)
    for digest, remote in sorted(found.items(), key=lambda kv: kv[1].name or ""):
        out.print(f"{remote.name}\t{remote.display_name or ''}\t{remote.mime_type or ''}\tsha256:{digest}", highlight=False, markup=False)
    out.print(f"{len(found)} file(s)", highlight=False)


@upload_media.command("delete")
def upload_media_delete(
    confirm_delete_all: Annotated[bool, typer.Option("--confirm-delete-all", help="Required: delete every uploaded file of this key.")] = False,
    env_file: EnvFile = Path(".env"),
) -> None:
    """Delete every file this key has uploaded."""
    from promptfleet import gemini_files

    if not confirm_delete_all:
        err.print("refusing to delete without --confirm-delete-all")
        raise typer.Exit(EXIT_BAD_INPUT)
    client = _gemini_client(env_file)
    Console().print(f"deleted {_gemini_call(gemini_files.delete_all(client))} file(s)")


batches_app = typer.Typer(no_args_is_help=True, help="The provider batches of a data folder's runs (batch mode).")
app.add_typer(batches_app, name="batches")


@batches_app.command("list")
def batches_list(
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
    offline: Annotated[bool, typer.Option("--offline", help="Only what the journals say; do not ask the providers.")] = False,
) -> None:
    """Every batch the runs under DATA/output/ submitted, with its state at the provider."""
    _load_env(env_file)
    from promptfleet.batch.admin import list_batches

    rows = asyncio.run(list_batches(data_folder, ask=not offline))
    from rich.table import Table

    table = Table("experiment", "run", "batch", "api/model", "prompts", "journal", "provider", "done")
    for row in rows:
        table.add_row(row.experiment, row.stamp, row.batch_id, f"{row.api}/{row.model}", str(row.prompts), row.journal,
                      row.provider_state or "-", row.counts or "-")  # fmt: skip
    Console(width=max(Console().width, 160)).print(table if rows else f"no batches under {data_folder / 'output'}")


@batches_app.command("cancel")
def batches_cancel(
    batch_ids: Annotated[Optional[list[str]], typer.Argument(help="Batch ids to cancel [default: every live one].")] = None,
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
) -> None:
    """Cancel live batches (all, or the ids given); the next run of each experiment collects
    their finished lines and writes the cancelled ones to the failed file."""
    _load_env(env_file)
    from promptfleet.batch.admin import cancel_batches

    done, problems = asyncio.run(cancel_batches(data_folder, batch_ids or None))
    for batch_id in done:
        Console(soft_wrap=True).print(f"cancelling {batch_id}", highlight=False)
    for problem in problems:
        err.print(problem, markup=False, highlight=False)
    if problems:
        raise typer.Exit(EXIT_BAD_INPUT)


def _env_lines_with_secret_blocks(found) -> list[str]:
    """Missing variables, counting Prefect Secret blocks as set when a server is at hand
    (`check` never starts one)."""
    if not found.missing_env:
        return []
    from promptfleet import server

    api = server.configured_api_url()
    if api is None and (running := server.status(server.prefect_home())) is not None:
        api = running.api_url
    if api is None:
        return _missing_env_lines(found, set(), "not set; Prefect Secret blocks not checked: no Prefect server is running")
    from promptfleet.tasks.secrets import secret_blocks_for

    with _api_url(api):
        try:
            present = asyncio.run(secret_blocks_for(n for names in found.missing_env.values() for n in names))
        except Exception as error:  # noqa: BLE001 - an unreachable server is not the file's fault
            return _missing_env_lines(found, set(), f"not set; Prefect Secret blocks not checked: {type(error).__name__}")
    return _missing_env_lines(found, present, "not set in the environment, the .env file or a Prefect Secret block")


server_app = typer.Typer(no_args_is_help=True, help="The background Prefect server that promptfleet commands share.")
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    port: Annotated[Optional[int], typer.Option(help="Port on 127.0.0.1 [default: PREFECT_SERVER_API_PORT, 4200, or a free one if that is taken].")] = None,
    _debug: Debug = False,
) -> None:
    """Start the background Prefect server (the first `run` does this too)."""
    from promptfleet import server

    if configured := server.configured_api_url():
        err.print(f"note: PREFECT_API_URL is set ({configured}); promptfleet commands use that server, not this one", markup=False)
    home = server.prefect_home()
    running = server.status(home)
    info = _background_server(home, port)
    Console(soft_wrap=True).print(f"Prefect server {'already running' if running else 'started'}: {info.ui_url} (pid {info.pid})", highlight=False)


@server_app.command("status")
def server_status(_debug: Debug = False) -> None:
    """Where the background server is (UI URL, PID); exit 1 when none is running."""
    from promptfleet import server

    info = server.status(server.prefect_home())
    out = Console(soft_wrap=True)
    if configured := server.configured_api_url():
        out.print(f"PREFECT_API_URL is set: commands use {configured}", highlight=False)
    if info is None:
        out.print("no background Prefect server running (the next `promptfleet run` starts one)", highlight=False)
        raise typer.Exit(1)
    state = "answering" if server.healthy(info.api_url) else "not answering"
    out.print(f"Prefect server: {info.ui_url} (pid {info.pid}, since {info.started}, {state})", highlight=False)
    from promptfleet import warm

    runner = warm.pid_of(server.prefect_home())
    out.print(f"warm runner: pid {runner} (commands start without importing Prefect)" if runner else
              f"warm runner: not running{'' if warm.enabled() else f' ({warm.OFF_ENV} is off)'}", highlight=False)  # fmt: skip


@server_app.command("stop")
def server_stop(_debug: Debug = False) -> None:
    """Stop the background Prefect server. Runs stay in its database for the next start."""
    from promptfleet import server

    info = server.stop(server.prefect_home())
    out = Console(soft_wrap=True)
    out.print(f"stopped the Prefect server at {info.ui_url} (pid {info.pid})" if info else "no background Prefect server running", highlight=False)


def main() -> None:
    """The `promptfleet` command: an unexpected error is one line; --debug shows its traceback."""
    try:
        app()
    except SystemExit:
        # Python's exit would garbage-collect the ~150,000 objects Prefect and pydantic built
        # (0.3-0.4 s CPU) only to hand their memory back to the OS; frozen, they are skipped.
        # Files and handlers are closed as usual (atexit and reference counting still run).
        gc.freeze()
        raise
    except Exception as error:  # noqa: BLE001 - the last line of defence for people, not for code
        if os.environ.get(DEBUG_ENV):
            raise
        from promptfleet.providers import redact

        first = (str(error).strip().splitlines() or [""])[0]
        err.print(f"error: {type(error).__name__}: {redact(first)} (run again with --debug for the traceback)", markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
