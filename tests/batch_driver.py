"""The child process of the kill -9 tests: one batch run of a file through the Python API
(no Prefect, so it starts fast), polling every 0.05 s.

    python -m tests.batch_driver FILE DATA_FOLDER
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from promptfleet.api import run_all
from promptfleet.core.config import Settings
from promptfleet.core.run import open_run
from promptfleet.core.session import Session


async def main(file: str, data: str) -> None:
    run = open_run(Path(file), Settings(data_folder=Path(data), batch=True, batch_poll=0.05, max_attempts=3), session=Session())
    try:
        await run_all(run)
    finally:
        await run.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
