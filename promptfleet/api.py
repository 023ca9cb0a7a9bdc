"""The Python API: an experiment run by the engine alone, without Prefect."""

from __future__ import annotations

import asyncio
from pathlib import Path

from promptfleet.batch import send_batches
from promptfleet.core.config import Settings
from promptfleet.core.run import Run, load_tables_meanwhile, open_run, run_log
from promptfleet.core.session import Session, current_session
from promptfleet.core.summary import RunSummary


class Experiment:
    """One experiment file, run by the same engine as the CLI but without Prefect.

    Like prompto, a bare file name is looked up in the data folder's `input/`. Experiments
    given the same `session` share pacers (one limit per model and key) and a stop signal.
    """

    def __init__(self, file_name: str | Path, settings: Settings | None = None, move_to_input: bool = False, session: Session | None = None):
        self.settings = settings or Settings()
        path = Path(file_name)
        if not path.exists() and (self.settings.input_folder / path).exists():
            path = self.settings.input_folder / path
        self.file = path
        self.move_to_input = move_to_input
        self.session = session

    async def process(self) -> RunSummary:
        """Validate, send every prompt, write the outputs; returns the run's summary."""
        run = open_run(self.file, self.settings, session=self.session or current_session(), move_to_input=self.move_to_input)
        try:
            return await run_all(run)
        finally:
            await run.aclose()


async def run_all(run: Run) -> RunSummary:
    """Every queue (and the batches) at once, then the tables: a whole run without Prefect."""
    with run_log(run.paths.log):
        tables = asyncio.create_task(load_tables_meanwhile())
        try:
            await asyncio.gather(*(run.send_queue(q) for q in run.queues), *([send_batches(run)] if run.plan.batch else []))
        finally:
            tables.cancel()
        return run.finish()
