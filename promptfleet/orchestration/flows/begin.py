"""What every promptfleet flow does as it starts, wherever it runs (the CLI's process, a
worker's flow-run process, a deployment run): Ctrl-C and SIGTERM stop it gracefully, and
promptfleet's own log lines go to the flow run's Logs tab in the UI."""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from promptfleet.core.session import Session
from promptfleet.core.signals import stop_on_signals

OUR_LOGGER = "promptfleet"


class _FlowRunLogs(APILogHandler):
    """Prefect's API log handler, quiet outside flow runs: the same process may run the
    engine without Prefect afterwards (the Python API), and those lines belong to no run."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get():
            super().emit(record)


def begin_flow(session: Session | None = None) -> None:
    stop_on_signals(session)
    logs_to_prefect()


def logs_to_prefect() -> None:
    """Give the `promptfleet` logger Prefect's API handler, as PREFECT_LOGGING_EXTRA_LOGGERS
    would: that setting is read once, when Prefect configures logging at import, so it
    misses every process it was not set for before then — a worker's flow runs, a
    notebook, a process that imported Prefect first."""
    ours = logging.getLogger(OUR_LOGGER)
    if not any(isinstance(handler, APILogHandler) for handler in ours.handlers):  # PREFECT_LOGGING_EXTRA_LOGGERS may have added one
        ours.addHandler(_FlowRunLogs())
    if ours.level == logging.NOTSET or ours.level > logging.INFO:
        ours.setLevel(logging.INFO)
