"""The Python API: an experiment run by the engine alone, without Prefect."""

from __future__ import annotations

import asyncio
from pathlib import Path

from promptfleet.batch import send_batches
from promptfleet.core import inbox
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
        """Validate, send every prompt, write the outputs; returns the run's summary.

        A file in the inbox is claimed as a poll or `promptfleet run` claims it, so a
        service watching the same folder never runs it again; raises `Taken` when another
        process has it or it ran already."""
        session = self.session or current_session()
        work = inbox.take(self.file, self.settings, session)
        summary = None
        try:
            run = open_run(work.file, self.settings, session=session, move_to_input=self.move_to_input or work.move)
            try:
                summary = await run_all(run)
            finally:
                await run.aclose()
            return summary
        finally:
            if summary is None:  # refused or broken before the run could release it
                session.lock_for(self.settings.output_folder / work.file.stem).release()
            work.settle(summary is not None and summary.complete, summary.paths.input if summary else None, self.settings.input_folder)


async def run_all(run: Run) -> RunSummary:
    """Every queue (and the batches) at once, then the tables: a whole run without Prefect."""
    with run_log(run.paths.log):
        tables = asyncio.create_task(load_tables_meanwhile())
        try:
            await asyncio.gather(*(run.send_queue(q) for q in run.queues), *([send_batches(run)] if run.plan.batch else []))
        finally:
            tables.cancel()
        return run.finish()
