"""Benchmarks: `python -m bench.run` starts the real server and measures it (see docs/performance.md)."""
