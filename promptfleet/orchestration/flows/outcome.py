"""A stopped run is Cancelled in the Prefect UI, yet its caller still gets what it did.

A flow that returns its summary ends Completed, which is what a run stopped by Ctrl-C,
SIGTERM or a lost worker would then show — though prompts are left. Returned as
`Cancelled(data=summary)` it shows as stopped; Prefect raises CancelledRun for such a
state at a plain call, so callers run the flow through `result_of`, which takes the summary
from its state.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prefect.client.schemas.objects import State
from prefect.states import Cancelled

from promptfleet.core.session import Session

T = TypeVar("T")


def ended(result: T, session: Session, unfinished: int) -> T:
    """`result` as the flow's return: Cancelled when a stop left prompts unsent."""
    if session.stopping and unfinished:
        return Cancelled(message=f"stopped with {unfinished} prompt(s) unfinished; run it again to resume", data=result)  # type: ignore[return-value]
    return result


async def result_of(flow: Any, **parameters: Any) -> Any:
    """What a flow call returned, for any final state; a failure's exception is raised, as a
    plain call would."""
    state: State = await flow(**parameters, return_state=True)
    result = await state.aresult(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result
