"""Flow `watch_input`: prompto's pipeline. Runs every experiment file waiting in the
input folder, oldest first, each as a `run_experiment` subflow.

A bad file is moved to `rejected/` with its error report and the watcher goes on; a run
that was stopped goes back to `input/` and resumes next time.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from promptfleet import inbox, runtime
from promptfleet.experiment import ExperimentError
from promptfleet.flows.run_experiment import run_experiment
from promptfleet.config import Settings

log = logging.getLogger("promptfleet.pipeline")


@flow(name="watch_input", log_prints=True)
async def watch_input(settings: Settings | None = None) -> list[dict[str, Any]]:
    settings = settings or Settings()
    for path in inbox.requeue_orphans(settings.input_folder):
        log.info("put back %s, left running by a process that is gone", path.name)
    summaries = []
    for path in inbox.waiting_files(settings.input_folder):
        if runtime.stop_event().is_set():
            break
        claimed = inbox.claim(path)
        if claimed is None:
            continue
        try:
            summary = await run_experiment(file=str(claimed), settings=settings)
        except ExperimentError as error:
            target = inbox.reject(claimed, str(error), settings.data_folder)
            log.error("%s cannot run and was moved to %s:\n%s", path.name, target, error)
            continue
        except Exception:
            inbox.release(claimed)
            log.exception("%s crashed; it is back in the input folder and will resume", path.name)
            continue
        if summary["complete"]:
            inbox.done(claimed)
        else:
            inbox.release(claimed)
        summaries.append(summary)
    return summaries
