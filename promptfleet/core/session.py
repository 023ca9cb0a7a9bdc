"""What the runs of one process share: the stop signal (Ctrl-C, SIGTERM), the pool of
pacers (one per model and credentials), the runs going on, for progress displays, and the
inbox claims its callers hold, whose runs stop when their lease is lost.

Whoever starts work opens a session — the CLI around its flow, a flow under a worker, the
Python API — and makes it current for the code it calls; Prefect tasks and flows called
from there inherit it through the context, so nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from promptfleet.core.limiter import PacerPool, SharedRateFactory
from promptfleet.core.rundir import RunLock

if TYPE_CHECKING:
    from promptfleet.core.engine import QueueStats
    from promptfleet.core.inbox import Claim
    from promptfleet.core.plan import Plan


class Running(Protocol):
    """What the session needs of a run going on: its stop signal, and its queues' progress."""

    stop: asyncio.Event
    stats: Mapping[str, QueueStats]


class Session:
    def __init__(self, shared_rates: SharedRateFactory | None = None) -> None:
        self.stop = asyncio.Event()
        self.pacers = PacerPool()
        self.shared_rates = shared_rates  # set by whoever reports to a Prefect server other processes share
        self.runs: list[Running] = []
        self._plans: dict[Path, Plan] = {}
        self._locks: dict[Path, RunLock] = {}
        self._claims: dict[Path, Claim] = {}

    def request_stop(self) -> None:
        self.stop.set()
        for run in self.runs:
            run.stop.set()

    def remember_plan(self, plan: Plan) -> None:
        """The CLI validates before Prefect starts; the flow reuses that pass."""
        self._plans[Path(plan.file)] = plan

    def plan_for(self, file: Path) -> Plan | None:
        return self._plans.pop(Path(file), None)

    def planned(self, file: Path) -> bool:
        """Whether the CLI planned this file, its API keys found (Secret blocks included)."""
        return Path(file) in self._plans

    def lock_for(self, out_dir: Path) -> RunLock:
        """The ownership lock of an experiment's output folder; the CLI takes it before Prefect
        starts (so a refusal is one line, not a failed flow) and the run keeps it."""
        return self._locks.setdefault(Path(out_dir).resolve(), RunLock(Path(out_dir)))

    def hold(self, claim: Claim) -> None:
        """An inbox file the caller claimed; its run follows the claim's lease."""
        self._claims[claim.path.resolve()] = claim

    def claim_for(self, file: Path) -> Claim | None:
        return self._claims.get(Path(file).resolve())

    def let_go(self, claim: Claim) -> None:
        self._claims.pop(claim.path.resolve(), None)

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()


_current: ContextVar[Session | None] = ContextVar("promptfleet_session", default=None)


def current_session() -> Session:
    """The session of the caller, or a new one for code started without (a worker's flow)."""
    session = _current.get()
    if session is None:
        session = Session()
        _current.set(session)
    return session


@contextmanager
def using(session: Session) -> Iterator[Session]:
    token = _current.set(session)
    try:
        yield session
    finally:
        _current.reset(token)
