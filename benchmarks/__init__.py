"""fastcm microbenchmarks: `python -m benchmarks` (CLI) or `pytest benchmarks` (pytest-benchmark)."""
