"""What the queues of runs share inside one process and cannot receive as parameters:
provider clients, spend, live queue stats, pacers shared by model and key, and the stop
signals. Prefect task parameters stay paths and plans; tasks look these up by run id.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from promptfleet.costs import Budget, Spend
from promptfleet.engine import QueueStats
from promptfleet.limiter import Pacer
from promptfleet.providers import Clients, provider_class
from promptfleet.providers.base import ProviderOptions, resolve_env


@dataclass
class RunState:
    clients: Clients
    spend: Spend
    budget: Budget
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stats: dict[str, QueueStats] = field(default_factory=dict)


_runs: dict[str, RunState] = {}
_pacers: dict[tuple, tuple[Pacer, int]] = {}
_stop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None


def open_run(run_id: str, options: ProviderOptions, spend: Spend, budget: Budget) -> RunState:
    if run_id not in _runs:
        _runs[run_id] = RunState(Clients(options), spend, budget)
        if stop_event().is_set():
            _runs[run_id].stop.set()
    return _runs[run_id]


def get_run(run_id: str) -> RunState | None:
    return _runs.get(run_id)


def active_runs() -> list[RunState]:
    return list(_runs.values())


async def close_run(run_id: str) -> None:
    if state := _runs.pop(run_id, None):
        await state.clients.aclose()


@contextmanager
def shared_pacer(run_id: str, queue: str, target: str | None, rpm: float, tpm: float | None, max_in_flight: int) -> Iterator[Pacer]:
    """One pacer per model and credentials while queues use it, so queues of runs going on
    at once in this process that hit the same model with the same key share its limit (the
    strictest ceiling wins). A queue that mixes models keeps a pacer of its own."""
    if target is None:
        key: tuple = ("queue", run_id, queue)
    else:
        api, _, model = target.partition("/")
        cls = provider_class(api)
        creds = sorted(resolve_env(cls.required_env + cls.optional_env, model).items())
        key = ("model", target, hashlib.sha256(repr(creds).encode()).hexdigest())
    if key in _pacers:
        pacer, users = _pacers[key]
        pacer.lower_ceiling(rpm)
    else:
        pacer, users = Pacer(rpm, max_in_flight, tpm), 0
    _pacers[key] = (pacer, users + 1)
    try:
        yield pacer
    finally:
        pacer, users = _pacers[key]
        if users == 1:
            del _pacers[key]
        else:
            _pacers[key] = (pacer, users - 1)


def stop_event() -> asyncio.Event:
    """The process-wide 'stop sending' signal (Ctrl-C, SIGTERM), bound to the running loop."""
    global _stop
    loop = asyncio.get_running_loop()
    if _stop is None or _stop[0] is not loop:
        _stop = (loop, asyncio.Event())
    return _stop[1]


def request_stop() -> None:
    stop_event().set()
    for run in _runs.values():
        run.stop.set()


def reset_stop() -> None:
    stop_event().clear()
