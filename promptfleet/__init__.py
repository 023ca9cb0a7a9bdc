"""promptfleet: run prompto-format LLM experiments fast, resumably, on Prefect.

Python API (no Prefect server needed)::

    from promptfleet import Experiment, Settings
    summary = await Experiment("data/input/exp.jsonl", Settings(data_folder="data")).process()
"""

from __future__ import annotations

from typing import Any

__all__ = ["Experiment", "ExperimentError", "Session", "Settings", "Taken"]

# loaded on first use: every `promptfleet` command imports this package, and one that
# only checks a file should not pay for the engine
_LAZY = {
    "Experiment": "promptfleet.api",
    "ExperimentError": "promptfleet.core.experiment",
    "Session": "promptfleet.core.session",
    "Settings": "promptfleet.core.config",
    "Taken": "promptfleet.core.inbox",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("promptfleet")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'promptfleet' has no attribute {name!r}")
