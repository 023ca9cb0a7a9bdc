"""Prefect flows."""

from promptfleet.flows.run_experiment import COMPLETED_EVENT, run_experiment
from promptfleet.flows.watch_input import watch_input

__all__ = ["COMPLETED_EVENT", "run_experiment", "watch_input"]
