"""Flow `watch_input`: prompto's pipeline. Runs the settled experiment files waiting in the
input folder, oldest first, each as a `run_experiment` subflow, one at a time: the next file
is claimed only when the current one is done, so the others stay in the inbox for other
polls. Under a deployment, a poll that sees more files waiting starts more polls, up to the
deployment's concurrency limit, so every worker takes a share.

Each file is taken through the one claim (`inbox.take`) every entry point uses. A bad file
is moved to `rejected/` with its error report and the watcher goes on; a run that was
stopped, or whose experiment another process is running, goes back to `input/`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from promptfleet.core import inbox
from promptfleet.core.config import Settings
from promptfleet.core.experiment import ExperimentError
from promptfleet.core.session import current_session
from promptfleet.core.summary import RunSummary
from promptfleet.orchestration.flows.begin import begin_flow
from promptfleet.orchestration.flows.lean import flow
from promptfleet.orchestration.flows.outcome import result_of
from promptfleet.orchestration.flows.run_experiment import run_experiment

log = logging.getLogger("promptfleet.pipeline")


def _poll_name() -> str:
    from prefect.runtime import flow_run

    settings = flow_run.parameters.get("settings") or {}
    folder = settings.get("data_folder", "data") if isinstance(settings, dict) else getattr(settings, "data_folder", "data")
    return f"poll-{Path(str(folder)).name}"


@flow(name="watch_input", flow_run_name=_poll_name, log_prints=True)
async def watch_input(settings: Settings | None = None) -> list[RunSummary]:
    settings = settings or Settings()
    session = current_session()
    begin_flow(session)
    if settings.data_folder.is_dir():  # a fresh clone has no inbox yet
        settings.input_folder.mkdir(exist_ok=True)
    summaries: list[RunSummary] = []
    tried: set[str] = set()
    while not session.stopping:
        _put_back_orphans(settings)  # before each file: a dead poll's file resumes here, not a poll later
        waiting = [path for path in inbox.waiting_files(settings.input_folder, settings.settle_seconds) if path.name not in tried]
        if not waiting:
            break
        if len(waiting) > 1:
            try:
                await _more_polls(len(waiting) - 1)
            except Exception as error:  # noqa: BLE001 - the schedule's next poll takes them instead
                log.warning("could not start more polls for the %d file(s) waiting: %s", len(waiting) - 1, error)
        path = waiting[0]
        tried.add(path.name)
        try:  # claimed here, so no subflow run starts for a file another poll has
            work = inbox.take(path, settings, session)
        except inbox.Taken as taken:
            log.info("%s", taken)
            continue
        try:  # the run settles its claim: back to the inbox unless finished, or rejected
            summary = await result_of(run_experiment, file=str(work.file), settings=settings, move_to_input=True)
        except ExperimentError:
            continue
        except BaseException:
            _give_back_whatever_is_left(work)
            raise
        if summary is None:
            continue
        summaries.append(summary)
        if summary.journal_error:  # the disk refuses writes: the next file would fail the same way
            log.error("%s; no further files are started", summary.journal_error)
            break
    return summaries


def _put_back_orphans(settings: Settings) -> None:
    ttl = settings.lease_seconds
    for path in inbox.requeue_orphans(settings.input_folder, lease_seconds=ttl) + inbox.requeue_stranded(settings.input_folder, settings.output_folder, lease_seconds=ttl):
        log.info("put back %s, left running by a process that is gone", path.name)


async def _more_polls(files: int) -> None:
    """Under a deployment with a concurrency limit: start polls for the free slots, at most
    one per file still waiting, so idle workers take them now rather than at the next
    scheduled poll. Polls already due count as started."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    deployment_id = context.flow_run.deployment_id if context and context.flow_run else None
    if deployment_id is None:  # `promptfleet pipeline`: one poll, no slots
        return
    async with get_client() as client:
        deployment = await client.read_deployment(deployment_id)
        limit = deployment.global_concurrency_limit
        if limit is None:
            return
        due = await client.count_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                                          expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(timezone.utc))),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        )  # fmt: skip
        for _ in range(min(files, limit.limit - limit.active_slots - due)):
            await client.create_flow_run_from_deployment(deployment_id, parameters=context.flow_run.parameters)


def _give_back_whatever_is_left(work: inbox.Work) -> None:
    """The run never started (a crash in Prefect before the flow's first line): the claim
    is still this poll's to settle."""
    if work.claim is not None and work.claim.held() and work.claim.path.exists():
        inbox.release(work.claim)
