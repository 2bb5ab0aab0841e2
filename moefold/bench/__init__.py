"""Command-line micro-benchmarks (`python -m moefold.bench.<name>`); tests never time them."""
