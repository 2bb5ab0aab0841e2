"""Test support: the fork-based multi-rank launcher and single-device oracles.

Library code never imports this package; tests and scripts do.
"""
