"""mixprec benchmarks: run with ``python benchmarks/run.py`` (see docs/performance.md)."""
