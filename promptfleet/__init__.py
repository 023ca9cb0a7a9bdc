"""promptfleet: run prompto-format LLM experiments fast, resumably, on Prefect.

Python API (no Prefect server needed)::

    from promptfleet import Experiment, Settings
    summary = await Experiment("data/input/exp.jsonl", Settings(data_folder="data")).process()
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from promptfleet import run
from promptfleet.experiment import ExperimentError
from promptfleet.config import Settings
from promptfleet.plan import Plan

__all__ = ["Experiment", "ExperimentError", "Settings"]


class Experiment:
    """One experiment file, run by the same engine as the CLI but without Prefect.

    Like prompto, a bare file name is looked up in the data folder's `input/`.
    """

    def __init__(self, file_name: str | Path, settings: Settings | None = None, move_to_input: bool = False):
        self.settings = settings or Settings()
        path = Path(file_name)
        if not path.exists() and (self.settings.input_folder / path).exists():
            path = self.settings.input_folder / path
        self.file = path
        self.move_to_input = move_to_input
        self.plan: Plan | None = None

    async def process(self) -> dict[str, Any]:
        """Validate, send every prompt, write the outputs; returns the run summary."""
        self.plan = run.prepare(self.file, self.settings, self.move_to_input)
        with run.run_log(self.plan.paths.log):
            stats = await asyncio.gather(*(run.run_one_queue(self.plan, q) for q in self.plan.queues))
            return await run.finish(self.plan, list(stats))
