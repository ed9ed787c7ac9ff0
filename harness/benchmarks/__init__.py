"""Speed and accuracy probes that print numbers (README "Benchmarks"): each a script,
``python -m harness.benchmarks.<name> --help``. Never part of the pipeline; smoke-tested on tiny data
(tests/integration/test_benchmark_scripts.py)."""
