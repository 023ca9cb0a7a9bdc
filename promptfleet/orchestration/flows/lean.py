"""How every promptfleet flow is made: its parameters as the Prefect API stores them, without
importing FastAPI, and its run kept alive for the server's crash detection
(`promptfleet.orchestration.crashed_runs`).

Prefect's `Flow.serialize_parameters` imports FastAPI's `jsonable_encoder` at every flow
call: ~170 ms of the ~1.5 s a `promptfleet run` adds to its experiment. pydantic's
`to_jsonable_python` gives the same JSON for what our flows take (dataclasses, paths,
plain values), and pydantic is imported already.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prefect import Flow
from prefect.futures import PrefectFuture
from prefect.states import State
from pydantic_core import to_jsonable_python

from promptfleet.core.session import Session, current_session
from promptfleet.orchestration.crashed_runs import kept_alive

log = logging.getLogger("promptfleet")


class LeanFlow(Flow):
    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        serialized: dict[str, Any] = {}
        for key, value in parameters.items():
            try:
                if isinstance(value, (PrefectFuture, State)):
                    raise TypeError  # stored by name, as Prefect does
                serialized[key] = to_jsonable_python(value)
            except Exception:  # what Prefect stores for a value it cannot encode
                serialized[key] = f"<{type(value).__name__}>"
        return serialized


def flow(**options: Any) -> Callable[[Callable[..., Any]], LeanFlow]:
    """Prefect's `@flow(...)`, making a LeanFlow of an async function whose runs are kept alive."""
    return lambda fn: LeanFlow(fn=_kept_alive(fn), **options)


def _kept_alive(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        loop, session = asyncio.get_running_loop(), current_session()
        with kept_alive(lambda why: loop.call_soon_threadsafe(_stop, session, why)):
            return await fn(*args, **kwargs)

    # The parameters' types resolved: Prefect builds its validation model in the namespace
    # of the function it is given, which is this module's, not the flow's.
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return run


def _stop(session: Session, why: str) -> None:
    if not session.stopping:
        log.warning("%s: stopping as on SIGTERM: no new requests; in-flight answers land and are journaled", why)
        session.request_stop()
