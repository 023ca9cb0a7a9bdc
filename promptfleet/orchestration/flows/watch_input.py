"""Flow `watch_input`: prompto's pipeline. Runs every settled experiment file waiting in
the input folder, oldest first, each as a `run_experiment` subflow.

Each file is taken through the one claim (`inbox.take`) every entry point uses. A bad file
is moved to `rejected/` with its error report and the watcher goes on; a run that was
stopped, or whose experiment another process is running, goes back to `input/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from promptfleet.core import inbox
from promptfleet.core.config import Settings
from promptfleet.core.experiment import ExperimentError
from promptfleet.core.session import current_session
from promptfleet.core.summary import RunSummary
from promptfleet.orchestration.flows.begin import begin_flow
from promptfleet.orchestration.flows.lean import flow
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
    ttl = settings.lease_seconds
    if settings.data_folder.is_dir():  # a fresh clone has no inbox yet
        settings.input_folder.mkdir(exist_ok=True)
    for path in inbox.requeue_orphans(settings.input_folder, lease_seconds=ttl) + inbox.requeue_stranded(settings.input_folder, settings.output_folder, lease_seconds=ttl):
        log.info("put back %s, left running by a process that is gone (its claim's lease expired)", path.name)
    summaries = []
    for path in inbox.waiting_files(settings.input_folder, settings.settle_seconds):
        if session.stopping:
            break
        try:  # claimed here, so no subflow run starts for a file another poll has
            work = inbox.take(path, settings, session)
        except inbox.Taken as taken:
            log.info("%s", taken)
            continue
        try:  # the run settles its claim: back to the inbox unless finished, or rejected
            summary = await run_experiment(file=str(work.file), settings=settings, move_to_input=True)
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


def _give_back_whatever_is_left(work: inbox.Work) -> None:
    """The run never started (a crash in Prefect before the flow's first line): the claim
    is still this poll's to settle."""
    if work.claim is not None and work.claim.held() and work.claim.path.exists():
        inbox.release(work.claim)
