"""`promptfleet judge`: prompto's `prompto_create_judge_file`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from promptfleet.cli.options import (
    EXIT_BAD_INPUT,
    Debug,
    err,
    fail,
    report_issues,
    split_list,
)
from promptfleet.cli.root import app
from promptfleet.core.experiment import ExperimentError


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
    from promptfleet.evaluation import judge as judging
    from promptfleet.orchestration.flows.evaluate import run_paths_of

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


