"""`moefold report RUN_DIR [RUN_DIR ...] [--out report.html]`: the sub-command's arguments."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_report_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `report` on the CLI's sub-parsers."""
    parser = sub.add_parser(
        "report",
        help="HTML page of charts from run folders (needs matplotlib: pip install -e '.[report]')",
        description="One self-contained HTML page from one or more run folders: loss, val loss "
        "and lr, tokens/s and MFU, dropped tokens, bytes per communication family, a per-layer "
        "expert-load heat map per run and a table of dead or overloaded experts. Several runs "
        "share each chart.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help="page to write; its PNGs go beside it (default: RUN_DIR/report.html for one run, "
        "report.html for several)",
    )
    parser.set_defaults(run=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    try:
        from moefold.report.page import build_report
    except ImportError as error:  # matplotlib is an extra
        print(f"moefold report: {error}; install it with pip install -e '.[report]'")
        return 2
    out = args.out or (Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else "report.html")
    try:
        path = build_report([Path(p) for p in args.runs], Path(out))
    except FileNotFoundError as error:
        print(f"moefold report: {error}")
        return 2
    print(f"moefold: report written to {path}")
    return 0
