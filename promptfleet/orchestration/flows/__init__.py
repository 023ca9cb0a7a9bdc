"""Prefect flows: the only code, with tasks.py and the server helpers, that imports Prefect."""
