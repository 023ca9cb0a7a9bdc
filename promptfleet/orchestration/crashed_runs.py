"""A flow run whose process is gone must not stay Running, or Pending, for ever: it would
hold a concurrency slot of its deployment, and with `CANCEL_NEW` every later poll would be
cancelled. A dead process cannot say it died, so the server notices the silence.

Every promptfleet flow run says it is alive four times per silence (an event of ours, sent
from a thread), and makes sure the server it reports to has one automation (Prefect's "detect
zombie flows" recipe): a run of a promptfleet flow that went Pending, or said it was alive,
and then for the silence said nothing more and reached no final state is marked Crashed — its
process was killed, its host died, or the worker starting it was stopped. Going Crashed
releases the deployment's concurrency slot at once (Prefect's own lease on the slot would
only lapse after 300 s). The automation lives on whichever server the runs report to,
created by the first run that finds it missing.

Our own event rather than Prefect's flow-run heartbeat: the heartbeat's period is a setting
of the process that runs the flow (180 s by default in Prefect 3.9), which promptfleet does
not control in a worker's flow runs or a notebook, and a silence can only be judged against
a beat that is known to come.

A flow run that a worker started also stops when that worker is gone: the worker starts it
in a session of its own, so killing the worker's process group leaves it sending. Its parent
process changing says so; it then stops as on SIGTERM (no new requests, what is in flight
lands and is journaled, the file goes back to the inbox) and reports its own end. Its output
went to the worker through a pipe, which is now broken: rich, behind Prefect's console log
handler, exits the process at the first line written to a broken pipe, so that output goes
to /dev/null instead (the run's log file and the Prefect API still get every line).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

log = logging.getLogger("promptfleet")

ALIVE_EVENT = "promptfleet.flow-run.alive"
SILENCE_ENV = "PROMPTFLEET_CRASH_SILENCE"  # seconds; read by every flow run, used by the one creating the automation
DEFAULT_SILENCE = timedelta(seconds=60)  # the default claim lease: a dead run is Crashed 60-75 s after its last word
MIN_SILENCE = timedelta(seconds=4)  # a beat every second; shorter would crash runs whose events are merely late
PARENT_CHECK_SECONDS = 0.2
AGAIN_AFTER_CREATING_SECONDS = 2.0  # the server watches a new automation's events within moments of its creation
AUTOMATION_PREFIX = "promptfleet: crash runs silent for"
RETIRED_AUTOMATIONS = ("promptfleet: crash runs whose process is gone",)  # heartbeat-based, before our own event
OUR_FLOWS = ("watch_input", "run_experiment", "judge_experiment", "rephrase_experiment", "run_study")
FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed")


def crash_silence() -> timedelta:
    """How long a run may be silent before it is marked Crashed. An operator's choice: shorter
    frees a dead worker's slots sooner, longer tolerates a network that drops out. The
    automation keeps the silence of the run that created it, so set it alike everywhere."""
    raw = os.environ.get(SILENCE_ENV, "").strip()
    if not raw:
        return DEFAULT_SILENCE
    try:
        silence = timedelta(seconds=float(raw))
    except (ValueError, OverflowError):
        silence = timedelta(0)
    if not silence >= MIN_SILENCE:
        raise ValueError(f"{SILENCE_ENV} must be a number of seconds, at least {MIN_SILENCE.total_seconds():g}, not {raw!r}")
    return silence


def automation_name(silence: timedelta) -> str:
    return f"{AUTOMATION_PREFIX} {silence.total_seconds():g} s"


@contextmanager
def kept_alive(stop: Callable[[str], None]) -> Iterator[None]:
    """For the flow run of the current context: say it is alive until the block ends, make
    sure the crash automation exists (a top-level run), and when a worker started this
    process, call `stop` (from another thread) once that worker is gone."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield
        return
    run = context.flow_run
    started_by_worker = os.environ.get("PREFECT__FLOW_RUN_ID") == str(run.id)
    silence = crash_silence()  # before anything starts: a bad value is the run's one error
    if started_by_worker:
        _survive_a_broken_pipe()
    beat = _Beat(
        silence=silence,
        resource={"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name or ""},
        related=[{"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow",
                  "prefect.resource.name": context.flow.name if context.flow else ""}],  # fmt: skip
        parent=os.getppid() if started_by_worker else None,
        top_level=run.parent_task_run_id is None,
        stop=stop,
    )
    # the thread sees this context's settings (the API URL the flow reports to)
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat.keep,), name=f"alive {run.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        beat.done.set()
        thread.join(timeout=5)  # a short run's process does not exit in the middle of setting up the automation


class _Beat:
    def __init__(self, silence: timedelta, resource: dict[str, str], related: list[dict[str, str]], parent: int | None, top_level: bool,
                 stop: Callable[[str], None]) -> None:  # fmt: skip
        self.silence, self.resource, self.related, self.parent, self.top_level, self.stop = silence, resource, related, parent, top_level, stop
        self.done = threading.Event()

    def keep(self) -> None:
        from prefect.events import emit_event

        next_beat = 0.0
        while not self.done.is_set():
            now = time.monotonic()
            if now >= next_beat:
                try:
                    emit_event(event=ALIVE_EVENT, resource=self.resource, related=self.related)
                except Exception as error:  # noqa: BLE001 - the next beat tries again; the thread must go on
                    log.debug("could not say the flow run is alive: %s", error)
                next_beat = now + self.silence.total_seconds() / 4
                if self.top_level:  # once, after the first word: off the flow's own path
                    self.top_level = False
                    try:
                        if ensure_crash_automation(self.silence):  # this run's first word came before it: say it again soon
                            next_beat = time.monotonic() + AGAIN_AFTER_CREATING_SECONDS
                    except Exception as error:  # noqa: BLE001 - a server without automations still runs flows
                        log.warning("cannot set up crash detection on the Prefect server: %s", error)
            if self.parent is not None and os.getppid() != self.parent:
                _output_to_devnull()
                self.stop(f"the worker that started this flow run (pid {self.parent}) is gone")
                self.parent = None
            self.done.wait(PARENT_CHECK_SECONDS if self.parent is not None else max(0.0, next_beat - time.monotonic()))


def _survive_a_broken_pipe() -> None:
    """Between the worker's death and our noticing it, a log line must not end the process."""
    loggers = [logging.root, *(x for x in list(logging.root.manager.loggerDict.values()) if isinstance(x, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            console = getattr(handler, "console", None)
            if console is not None and hasattr(console, "on_broken_pipe"):
                console.on_broken_pipe = functools.partial(_go_quiet, console)


def _go_quiet(console: Any) -> None:
    console.quiet = True
    _output_to_devnull()


def _output_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def ensure_crash_automation(silence: timedelta) -> bool:
    """Create the automation on the current API unless one exists (of any silence: a user's
    choice is kept); True when created."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ours = _ours(client)
        for retired in [a for a in ours if a.name in RETIRED_AUTOMATIONS]:
            _delete(client, retired.id)
        if any(a.name.startswith(AUTOMATION_PREFIX) for a in ours):
            return False
        client.create_automation(_automation(silence))
        made = sorted((a for a in _ours(client) if a.name.startswith(AUTOMATION_PREFIX)), key=lambda a: str(a.id))
        for extra in made[1:]:  # every racer keeps the same one
            _delete(client, extra.id)
        return True


def _ours(client: Any) -> list[Any]:
    return [a for a in client.read_automations() if a.name.startswith("promptfleet: crash runs")]


def _delete(client: Any, automation_id: Any) -> None:
    from prefect.exceptions import ObjectNotFound

    try:
        client.delete_automation(automation_id)
    except ObjectNotFound:  # another run deleted it first
        pass


def _automation(silence: timedelta) -> Any:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=automation_name(silence),
        description="Marks a run of a promptfleet flow Crashed when it went Pending or said it was alive, and then said nothing "
                    "more and did not finish: its process, its host or the worker starting it is gone. Crashed frees its "
                    "deployment's concurrency slot.",  # fmt: skip
        trigger=EventTrigger(
            after={ALIVE_EVENT, "prefect.flow-run.Pending", "prefect.flow-run.Submitting"},
            expect={ALIVE_EVENT, *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": list(OUR_FLOWS)}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=silence,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"silent for {silence.total_seconds():g} s: its process is gone")],
    )
