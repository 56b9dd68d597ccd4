"""Benchmarks of the GID project: ``python -m benchmarks.quality | speed | service``.

Each benchmark prints its table and writes JSON (and PNG plots) under ``benchmarks/results/``;
``docs/benchmarks.md`` shows the latest figures and how to read them.
"""
