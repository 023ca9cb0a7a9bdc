"""The three tasks of an experiment run. Caching is off: a run's effect is its journal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from promptfleet import runs
from promptfleet.runs import Plan, QueuePlan, Settings


@task(name="load_and_validate", cache_policy=NO_CACHE)
def load_and_validate(file: Path, settings: Settings, move_to_input: bool = False) -> Plan:
    return runs.prepare(file, settings, move_to_input)


@task(name="run_queue", task_run_name="{queue.name}", cache_policy=NO_CACHE)
async def run_queue(plan: Plan, queue: QueuePlan) -> dict[str, Any]:
    return await runs.run_one_queue(plan, queue)


@task(name="write_results", cache_policy=NO_CACHE)
async def write_results(plan: Plan, queue_stats: list[dict[str, Any]]) -> dict[str, Any]:
    return await runs.finish(plan, queue_stats)
