"""Micro-benchmarks run from the command line (`python -m moefold.bench.<name>`); no test imports them for timing."""
