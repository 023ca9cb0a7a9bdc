"""Options and failures shared by the commands: prompto's flags, one line per mistake."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console

from promptfleet.core.experiment import ExperimentError

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
DEFAULT_ENV_FILE = Path(".env")
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


def split_list(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def load_env(env_file: Path) -> None:
    """Read the .env file (before Prefect is imported: it reads its settings then)."""
    from dotenv import load_dotenv

    if env_file.is_dir() and env_file != DEFAULT_ENV_FILE:  # `.env/` is also a common name for a virtualenv
        fail(f"{env_file}: -e/--env-file names a folder; give the .env file in it (e.g. -e {env_file / '.env'})")
    if env_file.exists() and not env_file.is_dir():
        if not env_file.is_file():  # a FIFO would hang the command
            fail(f"{env_file}: -e/--env-file is not a regular file; give a .env file")
        try:
            load_dotenv(env_file, override=False)
        except (OSError, UnicodeDecodeError) as error:
            fail(f"{env_file}: cannot read the env file ({getattr(error, 'strerror', None) or error.__class__.__name__}); make it a readable UTF-8 file")
    # Offline by design: the temporary server's telemetry only fails noisily here.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_settings(**values: Any):
    from promptfleet.core.config import Settings

    return Settings(**values)


def require_data_folder(folder: Path, create: bool) -> None:
    """Refuse a data folder that does not exist (prompto does too): a typo must not scatter
    input/ and output/ folders around; --create-data-folder makes it."""
    if folder.is_dir():
        return
    if folder.exists():
        fail(f"{folder}: the data folder is a file, not a folder")
    if not create:
        fail(f"{folder}: data folder not found (check -d, or add --create-data-folder to create it)")
    folder.mkdir(parents=True)


MIN_FREE_BYTES = 64 << 10  # besides the input's copy: the lock, the state file and the first answers


def require_writable(out_dir: Path, input_size: int, code: int = EXIT_WRITE_FAILED) -> None:
    """Refuse, before anything is copied or sent, a run whose output cannot be written."""
    if problem := write_problem_of(out_dir, input_size):
        fail(f"cannot run: {problem}", code)


def write_problem_of(out_dir: Path, input_size: int) -> str | None:
    from promptfleet.core.rundir import write_problem

    return write_problem(out_dir, input_size + MIN_FREE_BYTES)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class _WriteFailureOffConsole(logging.Filter):
    """Prefect logs a flow's failure with the traceback of its exception, task and flow
    alike. When that exception is the disk refusing a write, the command says so in one
    line of its own; the traceback would only bury it. The records still reach the API
    (the run's log in the UI), and --debug shows them here too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError):
            return error.errno not in WRITE_ERRNOS
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()  # "Finished in state Failed('... OSError: [Errno 28] ...')"
        return not any(f"[Errno {n}]" in message or f"Error({n}," in message for n in WRITE_ERRNOS)


@contextmanager
def write_failures_in_one_line() -> Iterator[None]:
    """While open, Prefect's console output leaves out failures of writes to disk (unless --debug)."""
    from promptfleet.orchestration.server import console_handlers

    handlers = [] if os.environ.get(DEBUG_ENV) else console_handlers()
    quiet = _WriteFailureOffConsole()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err.print(message, markup=False, highlight=False)
    raise typer.Exit(code)


def this_command() -> str:
    """The command as it was typed, quoted: running it again resumes what it left."""
    return shlex.join(["promptfleet", *sys.argv[1:]])


def stopped_with(unfinished: int, what: str = "prompt(s)") -> NoReturn:
    err.print(f"stopped with {unfinished} {what} unfinished; to resume, run the same command again:")
    err.print("  " + this_command(), markup=False, highlight=False)
    raise typer.Exit(EXIT_INTERRUPTED)


def check_scorers(names: list[str]) -> None:
    """Import every scorer before anything starts, so a typo costs a second, not a run."""
    from promptfleet.core.scorers import scorer_problem

    for name in names:
        if problem := scorer_problem(name):
            fail(f"--scorer {name}: {problem}")



def missing_env_lines(found, present: set[str], where_hint: str) -> list[str]:
    lines = []
    for where, names in found.missing_env.items():
        if missing := [name for name in names if name not in present]:
            lines.append(f"{found.file}: env: {where} needs {', '.join(missing)} ({where_hint})")
    return lines


def report_issues(error: ExperimentError) -> None:
    if len(error.issues) == 1:
        err.print(f"cannot run: {error.issues[0]}", markup=False, highlight=False)
        return
    err.print(f"[red]cannot run: {len(error.issues)} problem(s)[/red]")
    for issue in error.issues:
        err.print(f"  {issue}", markup=False, highlight=False)


