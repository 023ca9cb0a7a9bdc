"""Prefect tasks: thin wrappers over `promptfleet.runs`; parameters are paths and plans."""

from promptfleet.tasks.experiment import load_and_validate, run_batches, run_queue, write_results

__all__ = ["load_and_validate", "run_batches", "run_queue", "write_results"]
