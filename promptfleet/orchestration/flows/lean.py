"""Our flows' parameters as the Prefect API stores them, without importing FastAPI.

Prefect's `Flow.serialize_parameters` imports FastAPI's `jsonable_encoder` at every flow
call: ~170 ms of the ~1.5 s a `promptfleet run` adds to its experiment. pydantic's
`to_jsonable_python` gives the same JSON for what our flows take (dataclasses, paths,
plain values), and pydantic is imported already.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow
from prefect.futures import PrefectFuture
from prefect.states import State
from pydantic_core import to_jsonable_python


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
    """Prefect's `@flow(...)`, making a LeanFlow."""
    return lambda fn: LeanFlow(fn=fn, **options)
