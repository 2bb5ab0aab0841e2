"""Command-line benchmarks (`moefold bench <suite>`); tests never time them."""

from __future__ import annotations

import argparse


def bench_parser(suite: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `moefold bench <suite>`: the module docstring's first paragraph as the
    description (whole, not its first line), and every default shown in --help."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(
        prog=f"moefold bench {suite}",
        description=" ".join(paragraph.split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
