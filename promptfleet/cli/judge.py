"""`promptfleet judge`: prompto's `prompto_create_judge_file`, or with `--run` the judging of
a completed run into its study table, without sending its prompts again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from promptfleet.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    DataFolder,
    Debug,
    EnvFile,
    Ephemeral,
    MaxQueries,
    err,
    fail,
    load_env,
    make_settings,
    report_issues,
    split_list,
    stopped_with,
)
from promptfleet.cli.root import app
from promptfleet.core.experiment import ExperimentError


@app.command()
def judge(
    judge_folder: Annotated[Path, typer.Option("--judge-folder", "-l", "-jf", help="Judge folder (settings.json + templates).")],
    judge: Annotated[str, typer.Option("--judge", "-j", help="Comma-separated judge ids from settings.json.")],
    input_file: Annotated[Optional[Path], typer.Option("--input-file", "-i", "--experiment-file", help="A completed file (<stamp>-completed-<name>.jsonl): write its judge file (prompto's).")] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="A completed file: judge it (once per judge setting) and write its study table.")] = None,
    judge_templates: Annotated[str, typer.Option("--judge-templates", "-jt", "--templates", "-t", help="Comma-separated template files.")] = "template.txt",
    output_folder: Annotated[Path, typer.Option("--output-folder", "-o", help="Folder to write judge-<input name>.jsonl in (prompto's).")] = Path("."),
    data_folder: DataFolder = Path("data"),
    env_file: EnvFile = Path(".env"),
    max_queries: MaxQueries = None,
    ephemeral: Ephemeral = False,
    _debug: Debug = False,
) -> None:
    """Create a judge experiment file from a completed one (prompto_create_judge_file), or
    with --run judge a completed run and write its study table (flow `judge_experiment`)."""
    if (input_file is None) == (run is None):
        fail("give one of --input-file (write the judge file) or --run (judge the run)")
    if run is not None:
        settings = make_settings(data_folder=data_folder, max_queries=max_queries)
        _judge_run(run, judge_folder, split_list(judge), split_list(judge_templates), settings, env_file, ephemeral)
        return
    from promptfleet.evaluation import judge as judging
    from promptfleet.evaluation.judged import run_paths_of

    if not input_file.is_file():
        fail(f"{input_file}: file not found")
    completed = "-completed-" in input_file.name
    out = output_folder / judging.judge_file_name(input_file)
    failed = run_paths_of(input_file).failed if completed else None
    if output_folder.exists() and not output_folder.is_dir():
        err.print(f"{output_folder}: --output-folder is a file, not a folder", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:  # the folder is made only once the judge file can be written
        made = judging.write_judge_file(input_file, judge_folder, split_list(judge_templates), split_list(judge), out, failed)
    except ExperimentError as error:
        report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except OSError as error:  # a missing parent, no permission, a name taken by a folder: say which path and why
        fail(f"{out}: cannot write the judge file there ({error.strerror or error})")
    Console(soft_wrap=True).print(f"wrote {made.records} judge prompt(s) to {out}", highlight=False)
    if made.skipped_failed:
        err.print(f"{made.skipped_failed} failed prompt(s) not judged: failed prompts have no response to judge")


def _judge_run(completed: Path, folder: Path, judges: list[str], templates: list[str], settings, env_file: Path, ephemeral: bool) -> None:
    load_env(env_file)
    from promptfleet.evaluation import judge as judging

    if not completed.is_file() or "-completed-" not in completed.name:
        fail(f"{completed}: not a completed file (<stamp>-completed-<name>.jsonl)")
    try:  # a bad judge folder is refused before anything is sent
        judging.load_judge_folder(folder, templates, judges)
    except ExperimentError as error:
        report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    from promptfleet.cli.console import print_study
    from promptfleet.cli.prefect_api import prefect_api
    from promptfleet.cli.run import in_flow
    from promptfleet.evaluation.outcomes import Study
    from promptfleet.orchestration.flows.evaluate import judge_experiment
    from promptfleet.core.session import Session
    from promptfleet.orchestration.flows.outcome import result_of

    session = Session()
    with prefect_api(ephemeral):
        judged = asyncio.run(in_flow(lambda: result_of(judge_experiment, completed=str(completed), judge_folder=str(folder),
                                                       judges=judges, templates=templates, settings=settings), session))  # fmt: skip
    if judged is None:  # judged already or being judged elsewhere (the line above says which), or abandoned by a second Ctrl-C
        if session.stopping:
            raise typer.Exit(EXIT_INTERRUPTED)
        return
    if not judged.judge_run.complete:
        stopped_with(judged.judge_run.unfinished, "judge prompt(s)")
    print_study(Study(judged.judge_run, judge=judged), Console(width=max(Console().width, 120)))
