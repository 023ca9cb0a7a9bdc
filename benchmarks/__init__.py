"""Reproducible side-by-side benchmarks against local fake servers: `python -m benchmarks`."""
