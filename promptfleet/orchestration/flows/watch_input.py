"""Flow `watch_input`: prompto's pipeline. Runs every settled experiment file waiting in
the input folder, oldest first, each as a `run_experiment` subflow.

A bad file is moved to `rejected/` with its error report and the watcher goes on; a run
that was stopped, or whose experiment another process is running, goes back to `input/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from promptfleet.core import inbox
from promptfleet.core.config import Settings
from promptfleet.core.experiment import ExperimentError
from promptfleet.core.rundir import RunBusy
from promptfleet.core.session import current_session
from promptfleet.core.signals import stop_on_signals
from promptfleet.core.summary import RunSummary
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
    stop_on_signals(session)
    ttl = settings.lease_seconds
    for path in inbox.requeue_orphans(settings.input_folder, lease_seconds=ttl) + inbox.requeue_stranded(settings.input_folder, settings.output_folder, lease_seconds=ttl):
        log.info("put back %s, left running by a process that is gone (its claim's lease expired)", path.name)
    summaries = []
    for path in inbox.waiting_files(settings.input_folder, settings.settle_seconds):
        if session.stopping:
            break
        claimed = inbox.claim(path, ttl)
        if claimed is None:
            continue
        claimed.holder.start()
        session.hold(claimed)
        try:
            summary = await run_experiment(file=str(claimed.path), settings=settings, move_to_input=True)
        except ExperimentError as error:
            target = inbox.reject(claimed, str(error), settings.data_folder)
            first = f", first: {error.issues[0]}" if error.issues else ""
            log.error("%s cannot run (%d problem(s)%s); moved to %s with the full report", path.name, len(error.issues), first, target)
            continue
        except RunBusy as busy:
            inbox.release(claimed)
            log.info("%s is being run by %s; left in the inbox", path.name, busy)
            continue
        except BaseException:
            _give_back_whatever_is_left(claimed)
            raise
        finally:
            session.let_go(claimed)
        if not summary.complete:
            inbox.give_back_claimed(claimed, summary.paths.input, settings.input_folder)
        claimed.end()
        summaries.append(summary)
        if summary.journal_error:  # the disk refuses writes: the next file would fail the same way
            log.error("%s; no further files are started", summary.journal_error)
            break
    return summaries


def _give_back_whatever_is_left(claimed: inbox.Claim) -> None:
    """A crash or an abandoned run: the file goes back to the inbox wherever it got to (a
    working copy next to its outputs, by the next poll's `requeue_stranded`, which the
    run's released lock lets through at once once the lease record is gone)."""
    if claimed.path.exists():
        inbox.release(claimed)
    else:
        claimed.end()
