"""promptfleet: run prompto-format LLM experiments fast, resumably, on Prefect.

Python API (no Prefect server needed)::

    from promptfleet import Experiment, Settings
    summary = await Experiment("data/input/exp.jsonl", Settings(data_folder="data")).process()
"""

from __future__ import annotations

from typing import Any

__all__ = ["Experiment", "ExperimentError", "Session", "Settings"]

# loaded on first use: `promptfleet` the command imports this package before it knows
# whether its work runs here or in the warm runner, and should cost nothing until then
_LAZY = {
    "Experiment": "promptfleet.api",
    "ExperimentError": "promptfleet.core.experiment",
    "Session": "promptfleet.core.session",
    "Settings": "promptfleet.core.config",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("promptfleet")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'promptfleet' has no attribute {name!r}")
