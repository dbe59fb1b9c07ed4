"""Serving benchmark: drives a running (or launched) lightserve over HTTP with a seeded workload,
reports throughput and TTFT / TPOT / ITL, and runs the same workload through transformers' static
batching for a side-by-side ratio. Entry point: `python -m lightserve.benchmark` (see `cli.py`)."""
