"""Flow `run_experiment`: load_and_validate -> one run_queue per queue, concurrently -> write_results."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import acreate_markdown_artifact
from prefect.runtime import flow_run

from promptfleet.report import summary_markdown
from promptfleet.runs import Settings, run_log
from promptfleet.tasks import load_and_validate, run_queue, write_results


def _run_name() -> str:
    return Path(str(flow_run.parameters["file"])).stem


@flow(name="run_experiment", flow_run_name=_run_name, log_prints=True)
async def run_experiment(file: str, settings: Settings | None = None, move_to_input: bool = False) -> dict[str, Any]:
    """Run one prompto-format experiment file; every queue is a task in one event loop."""
    settings = settings or Settings()
    plan = load_and_validate(Path(file), settings, move_to_input)
    with run_log(plan.paths.log):
        stats = await asyncio.gather(*(run_queue(plan, queue) for queue in plan.queues))
        summary = await write_results(plan, list(stats))
    await acreate_markdown_artifact(
        key="experiment-summary",
        markdown=summary_markdown(summary),
        description=f"promptfleet summary of {plan.name}",
    )
    return summary
