"""What the queues of a run share inside one process and cannot receive as parameters:
provider clients, live queue stats for the progress display, and the stop signal.

Prefect task parameters stay paths and plans; the tasks look these up by run id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from promptfleet.engine import QueueStats
from promptfleet.providers import Clients
from promptfleet.providers.base import ProviderOptions


@dataclass
class RunState:
    clients: Clients
    stats: dict[str, QueueStats] = field(default_factory=dict)


_runs: dict[str, RunState] = {}
_stop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None


def open_run(run_id: str, options: ProviderOptions) -> RunState:
    if run_id not in _runs:
        _runs[run_id] = RunState(Clients(options))
    return _runs[run_id]


def get_run(run_id: str) -> RunState | None:
    return _runs.get(run_id)


def active_runs() -> list[RunState]:
    return list(_runs.values())


async def close_run(run_id: str) -> None:
    if state := _runs.pop(run_id, None):
        await state.clients.aclose()


def stop_event() -> asyncio.Event:
    """The process-wide 'stop sending' signal (Ctrl-C, SIGTERM), bound to the running loop."""
    global _stop
    loop = asyncio.get_running_loop()
    if _stop is None or _stop[0] is not loop:
        _stop = (loop, asyncio.Event())
    return _stop[1]


def request_stop() -> None:
    stop_event().set()
