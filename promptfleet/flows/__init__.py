"""Prefect flows."""

from promptfleet.flows.run_experiment import run_experiment

__all__ = ["run_experiment"]
