"""The three tasks of an experiment run. Caching is off: a run's effect is its journal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from promptfleet import run
from promptfleet.config import Settings
from promptfleet.plan import Plan, QueuePlan


@task(name="load_and_validate", cache_policy=NO_CACHE)
def load_and_validate(file: Path, settings: Settings, move_to_input: bool = False) -> Plan:
    return run.prepare(file, settings, move_to_input)


@task(name="run_queue", task_run_name="{queue.name}", cache_policy=NO_CACHE)
async def run_queue(plan: Plan, queue: QueuePlan) -> dict[str, Any]:
    return await run.run_one_queue(plan, queue)


@task(name="write_results", cache_policy=NO_CACHE)
async def write_results(plan: Plan, queue_stats: list[dict[str, Any]]) -> dict[str, Any]:
    return await run.finish(plan, queue_stats)
