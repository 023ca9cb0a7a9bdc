"""`promptfleet` command line: prompto's commands and flags, Prefect underneath."""

from __future__ import annotations

import gc
import os
import sys

from promptfleet.cli import (  # noqa: F401 - each registers its command
    batches,
    check,
    judge,
    missing,
    pipeline,
    report,
    run,
    server,
    upload_media,
    worker,
)
from promptfleet.cli.options import DEBUG_ENV, EXIT_BAD_INPUT, err
from promptfleet.cli.root import app


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

