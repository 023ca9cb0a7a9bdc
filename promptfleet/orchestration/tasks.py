"""The three tasks of an experiment run, thin over `promptfleet.core.run`. They pass the live
`Run` object (Prefect 3 hands task parameters over as they are when caching is off); the
records never travel as parameters."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from promptfleet.batch import send_batches
from promptfleet.core.config import Settings
from promptfleet.core.engine import QueueStats
from promptfleet.core.experiment import ExperimentError
from promptfleet.core.plan import QueuePlan
from promptfleet.core.run import Run, open_run
from promptfleet.core.session import Session
from promptfleet.core.summary import RunSummary
from promptfleet.orchestration.links import this_flow_run


@task(name="load_and_validate", cache_policy=NO_CACHE)
async def load_and_validate(
    file: Path, settings: Settings, session: Session, move_to_input: bool = False, wait: bool = False
) -> Run | ExperimentError:
    """The run, or the problems of a file that cannot run: finding them is this task's job
    done, so they are its result, not a crash with a traceback. Async although the work is
    not: a sync task costs a second Prefect client (and its TLS set-up) per run."""
    try:
        return open_run(file, settings, session=session, move_to_input=move_to_input, plan=session.plan_for(Path(file)), wait=wait)
    except ExperimentError as error:
        return error


@task(name="run_queue", task_run_name="{queue.name}", cache_policy=NO_CACHE)
async def run_queue(run: Run, queue: QueuePlan) -> QueueStats:
    return await run.send_queue(queue)


@task(name="run_batches", cache_policy=NO_CACHE)
async def run_batches(run: Run) -> QueueStats:
    return await send_batches(run)


@task(name="write_results", cache_policy=NO_CACHE)
async def write_results(run: Run) -> RunSummary:
    """Async with the writing in a thread, for the reason load_and_validate is async."""
    return await asyncio.to_thread(run.finish, orchestration=this_flow_run())
