"""The Python API: an experiment run by the engine alone, without Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from promptfleet.config import Settings
from promptfleet.run import open_run, run_all
from promptfleet.session import Session, current_session


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

    async def process(self) -> dict[str, Any]:
        """Validate, send every prompt, write the outputs; returns the run summary."""
        run = open_run(self.file, self.settings, session=self.session or current_session(), move_to_input=self.move_to_input)
        try:
            return (await run_all(run)).to_dict()
        finally:
            await run.aclose()
