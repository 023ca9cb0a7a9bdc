"""SIGINT and SIGTERM mean the same everywhere: stop sending, let in-flight answers land
and be journaled, then stop. That holds for `promptfleet run`, the pipeline, and flows run
by a worker, where SIGTERM is what `docker stop`, systemd and Prefect cancellation send.

Prefect's flow engine installs its own SIGTERM handler when a flow starts (it raises
`TerminationSignal`: a traceback, and answers in flight are lost and paid again on
resume), so every promptfleet flow calls `stop_on_signals()` again as it starts.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from promptfleet.core.session import Session

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stop_on_signals(session: Session | None = None, say: Callable[[str], None] = _to_stderr) -> None:
    """Route SIGINT and SIGTERM in the running event loop to a graceful stop of the
    session's runs (by default the caller's session). A second signal abandons what is
    still in flight by cancelling the task that called this (the CLI makes that exit 130).

    A no-op outside the main thread, where Python cannot take signals.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if session is None:
        from promptfleet.core.session import current_session

        session = current_session()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _on_signal, session, main, say)


def _on_signal(session: Session, main: asyncio.Task | None, say: Callable[[str], None]) -> None:
    if session.stopping:
        say("second interrupt: abandoning in-flight requests")
        if main is not None:
            main.cancel()
        return
    say("stopping: no new requests; waiting for in-flight answers (interrupt again to abandon them)")
    session.request_stop()
