"""`promptfleet check`: validate an experiment without sending anything."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from promptfleet.cli.options import (
    EXIT_BAD_INPUT,
    Batch,
    DataFolder,
    Debug,
    EnvFile,
    File,
    MaxQueries,
    MaxQueriesJson,
    MoveToInput,
    Parallel,
    Prices,
    err,
    load_env,
    make_settings,
    missing_env_lines,
    report_issues,
    require_data_folder,
    write_problem_of,
)
from promptfleet.cli.prefect_api import env_lines_with_secret_blocks
from promptfleet.cli.root import app
from promptfleet.core.experiment import ExperimentError


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
    load_env(env_file)
    from promptfleet.core.plan import inspect

    settings = make_settings(
        data_folder=data_folder, max_queries=max_queries, parallel=parallel, max_queries_json=max_queries_json, prices=prices,
        batch=batch,
    )  # fmt: skip
    if move_to_input:
        require_data_folder(data_folder, create=False)
    try:
        found = inspect(file, settings)
    except ExperimentError as error:
        report_issues(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    env_lines = env_lines_with_secret_blocks(found)
    if problem := write_problem_of(settings.output_folder / found.name, 0 if move_to_input else found.size):
        env_lines.append(problem)  # what `run` would meet first: checked here, where it costs nothing
    print_inspection(found, batch, env_lines)
    if log_file:
        log_file.write_text("".join(f"{line}\n" for line in [*found.issues, *env_lines]))
    if found.issue_count or env_lines:
        raise typer.Exit(EXIT_BAD_INPUT)
    if move_to_input or data_folder.is_dir():  # a fresh clone has no inbox yet; the README drops files there
        settings.input_folder.mkdir(parents=move_to_input, exist_ok=True)
    if move_to_input:
        file.rename(settings.input_folder / file.name)
    Console().print("[green]ok[/green]")




def print_inspection(found, batch: bool = False, env_lines: list[str] | None = None) -> None:
    out = Console(soft_wrap=True)
    for issue in found.issues:
        err.print(issue, markup=False, highlight=False)
    if found.issue_count > len(found.issues):
        err.print(f"... and {found.issue_count - len(found.issues)} more problems")
    for line in missing_env_lines(found, set(), "not set") if env_lines is None else env_lines:
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


