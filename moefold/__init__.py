"""moefold: Mixture-of-Experts training with MoE Parallel Folding."""

__version__ = "0.1.0"
