"""Prefect at the edge: flows, tasks, the background server and the shared rate limit."""
