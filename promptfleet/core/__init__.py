"""The engine of a run, without Prefect: experiment files, plans, queues, pacing, the journal."""
