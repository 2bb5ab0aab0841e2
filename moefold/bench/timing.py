"""Benchmark plumbing shared by the `moefold.bench` scripts: timed steps, the run's environment,
the measured matmul peak, and the result table as text or JSON.

Nothing here knows about MoE; a benchmark hands in callables that run one step and gets back
seconds per step. Progress goes to stderr so that stdout holds only the table (or the JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moefold.kernels.gemm import cpu_bf16_gemm_is_slow
from moefold.train.host_memory import keep_freed_host_memory
from moefold.train.peak import cpu_model_name, measure_matmul_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_interleaved(
    steps_by_name: dict[str, Callable[[], None]],
    steps: int,
    warmup: int,
    align: Callable[[], None] | None = None,
    budget_s: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per step of every callable, timed round-robin.

    Each callable first runs `warmup` untimed steps; then the timed steps alternate between the
    callables, so a noisy neighbour that comes and goes on a shared machine slows all of them
    alike instead of whichever happened to run at that moment.

    `align` (untimed) runs before every timed step: on ranks, a barrier. Without it a row that
    communicates would be charged for the skew an earlier row left between the ranks (its
    first collective waits for the slowest rank to finish that row); measured on 4 ranks: the
    dense row leaves up to 0.5 s of skew, a fifth of a step.

    `budget_s` > 0 caps the timed seconds of each callable: one whose timed steps add up to
    the budget leaves the rotation (after at least one timed step), so its list is shorter;
    round i of every list still holds the steps that ran side by side. For a baseline that
    runs tens of times slower than the rest (a bf16 kernel a CPU lacks the instructions for),
    which would otherwise take most of an hour. No budget on ranks: every rank must run the
    same steps, and their clocks differ.
    """
    if budget_s > 0 and align is not None:
        raise ValueError("budget_s: a time budget would let ranks run different steps")
    for name, step in steps_by_name.items():
        progress(f"warm-up {name} ({warmup} steps)")
        tic = time.perf_counter()
        for _ in range(warmup):
            step()
        if warmup:
            per_step = (time.perf_counter() - tic) / warmup
            progress(f"warm-up {name}: {per_step:.3g} s a step")
    seconds: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for index in range(steps):
        running = {
            name: step
            for name, step in steps_by_name.items()
            if budget_s <= 0 or sum(seconds[name]) < budget_s  # an untimed row sums to 0
        }
        if not running:
            break
        progress(f"timed step {index + 1}/{steps}")
        for name, step in running.items():
            if align is not None:
                align()
            tic = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - tic)
    for name, timed in seconds.items():
        if len(timed) < steps:
            progress(f"{name}: {len(timed)} of {steps} steps timed (budget {budget_s:g} s)")
    return seconds


def same_round_pairs(first: Sequence[float], second: Sequence[float]) -> list[tuple[float, float]]:
    """(first[i], second[i]) for the rounds both lists reached: a time budget
    (`time_interleaved`) may have cut one short, and round i of each ran side by side."""
    rounds = min(len(first), len(second))
    return list(zip(first[:rounds], second[:rounds], strict=True))


def paired_ratio_quartiles(base_s: Sequence[float], row_s: Sequence[float]) -> tuple[float, float]:
    """First and third quartile of base / row over the steps timed in the same round.

    The ratio of medians is the headline figure; this range says how much of it a noisy
    neighbour could have made up: steps of one round ran within seconds of each other, so
    their ratio cancels most of the slow drift that separates rounds."""
    ratios = [base / row for base, row in same_round_pairs(base_s, row_s)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return first, third


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def peak_matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose matmul peak bounds `dtype`'s products here: fp32 for bf16 on a CPU
    without bf16 instructions (bf16 products run as fp32 GEMMs there, kernels/gemm.py)."""
    if dtype == torch.bfloat16 and cpu_bf16_gemm_is_slow():
        return torch.float32
    return dtype


def measure_peak(dtype: torch.dtype, matmul_size: int, budget_s: float = 1.0) -> float:
    """Best torch.matmul FLOP/s at the current thread count for products of `dtype`
    (`peak_matmul_dtype`), measured now (never cached)."""
    matmul_dtype = peak_matmul_dtype(dtype)
    return measure_matmul_flops(matmul_dtype, matmul_size=matmul_size, budget_s=budget_s)


def pool_peaks(peaks: dict[str, float]) -> dict[str, float]:
    """Each dtype's peak (keyed by DTYPES name) raised to the best reading of the kernel its
    products run on (`peak_matmul_dtype`). On a CPU without bf16 units the fp32 and bf16
    readings time the same fp32 GEMM; one reading that a busy second left low (measured: fp32
    131 against bf16 182 GFLOP/s in one run) would otherwise inflate that dtype's MFU."""
    kernel = {name: peak_matmul_dtype(DTYPES[name]) for name in peaks}
    best: dict[torch.dtype, float] = {}
    for name, flops in peaks.items():
        best[kernel[name]] = max(flops, best.get(kernel[name], 0.0))
    return {name: best[kernel[name]] for name in peaks}


def add_share_of_peak(rows: list[dict], peaks: dict[str, float], key: str) -> None:
    """rows[i][key] = percent of its dtype's peak that the row's tflops reach (MFU)."""
    for row in rows:
        row[key] = 100.0 * row["tflops"] * 1e12 / peaks[row["dtype"]]


def environment() -> dict[str, Any]:
    """What the numbers depend on: torch build, thread count, CPU model, Python."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model_name(),
        "python": platform.python_version(),
    }


def add_host_memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's defaults (blocks > 32 MiB mapped and page-faulted afresh each time); "
        "by default freed memory is kept for every row, as `moefold train` does",
    )


def add_row_budget_flag(parser: argparse.ArgumentParser, why: str) -> None:
    """`--row-budget-s`: `time_interleaved`'s budget_s; `why` ends the help text."""
    parser.add_argument(
        "--row-budget-s",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop timing a row once its timed steps add up to this (at least one is timed; "
        f"0 = time every step). {why}",
    )


def row_budget_note(budget_s: float, scope: str = "", detail: str = "") -> str:
    """The header's sentence on `--row-budget-s` ("" when there is no budget)."""
    if budget_s <= 0:
        return ""
    return f"; {scope}a row stops being timed once its timed steps add up to {budget_s:g} s{detail}"


def check_row_budget(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.row_budget_s < 0:
        parser.error("--row-budget-s must be >= 0 (0 = no budget)")


def apply_host_memory(args: argparse.Namespace) -> str:
    """Apply the run's host-memory policy to this process (and ranks forked from it), before
    any row is built; returns the header's description of it. Every row runs under it."""
    if not args.system_malloc and keep_freed_host_memory():
        return "glibc keeps freed memory for reuse, every row (train.keep_host_memory)"
    return "allocator defaults (glibc maps and page-faults blocks > 32 MiB afresh)"


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header and a format spec for numbers."""

    key: str
    header: str
    spec: str = ""


# Every benchmark row has these keys (the --json contract), in this order in the tables.
ROW_COLUMNS = (
    Column("name", "name"),
    Column("dtype", "dtype"),
    Column("ep", "ep"),
    Column("tokens_per_s", "tokens_per_s", ".0f"),
    Column("tflops", "tflops", ".4f"),
)


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)) and spec:  # a range, e.g. quartiles
        return "-".join(format(item, spec) for item in value)
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table (pastes into docs as is); text columns left-aligned, numbers right."""
    cells = [[_cell(row.get(c.key), c.spec) for c in columns] for row in rows]
    widths = [
        max([len(c.header)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)
    ]
    numeric = [
        all(isinstance(row.get(c.key), (int, float)) for row in rows) and bool(rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if is_number else v.ljust(w)
            for v, w, is_number in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    dashes = [
        "-" * (w + 1) + ":" if is_number else "-" * (w + 2)
        for w, is_number in zip(widths, numeric, strict=True)
    ]
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line([c.header for c in columns]), rule] + [line(c) for c in cells])


def format_header(items: dict[str, Any]) -> str:
    """`# key: value` lines printed above a table."""
    return "\n".join(f"# {key}: {value}" for key, value in items.items())


def to_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=False)


def print_report(
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    columns: Sequence[Column],
    as_json: bool,
    **extra: Any,
) -> None:
    """The run's header and its table, or one JSON document (header, `extra`, rows)."""
    if as_json:
        print(to_json({**info, **extra, "rows": rows}))
    else:
        print(format_header(info))
        print(format_table(rows, columns))
