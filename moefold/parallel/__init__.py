"""Parallelism: rank layout, process groups, and the apply_* functions."""
