"""Console progress on the logging rank: a tqdm bar on a terminal, plain lines otherwise
(Slurm logs, pipes, `tee`), every `train.log_every` steps; and the end-of-run summary.

Lines go through the `logging` module (so a file handler such as OUT/train.log gets them too);
while no handler is set up at INFO (a library caller, or tests) they are printed instead.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Expert-load flags (also used by `moefold report`): an expert is "dead" when it received
# less than DEAD_SHARE of the uniform share (tokens * top-k / E) over the steps considered,
# and "overloaded" when it received more than OVERLOAD_SHARE times the uniform share.
DEAD_SHARE = 0.1
OVERLOAD_SHARE = 2.0


def emit(message: str) -> None:
    """One progress line: to the `logging` handlers when they take INFO, else to stdout."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    else:
        print(message, flush=True)


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_step(row: dict[str, Any], total: int) -> str:
    """`step 10/80 | loss 5.1234 | val 5.2000 | lr 3.00e-03 | 1234 tok/s | mfu 3.1%`."""
    parts = [f"step {row['step']}/{total}", f"loss {row['loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    if isinstance(row.get("mfu"), float) and math.isfinite(row["mfu"]):
        parts.append(f"mfu {row['mfu'] * 100:.1f}%")
    dropped = row.get("dropped_frac") or {}
    if dropped and max(dropped.values()) > 0:
        parts.append(f"dropped {max(dropped.values()) * 100:.1f}%")
    return " | ".join(parts)


class Progress:
    """Per-step progress on the logging rank; silent elsewhere.

    On a terminal: a tqdm bar whose postfix is refreshed every `log_every` steps. Otherwise:
    one plain line every `log_every` steps and at the last step (no carriage returns).
    """

    def __init__(
        self,
        enabled: bool,
        total: int,
        initial: int,
        log_every: int = 1,
        terminal: bool | None = None,
    ) -> None:
        self.enabled, self.total, self.log_every = enabled, total, max(1, log_every)
        self.bar = None
        if enabled and (is_terminal() if terminal is None else terminal):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        due = row["step"] % self.log_every == 0 or row["step"] == self.total
        if self.bar is not None:
            if due:
                postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                if "val_loss" in row:
                    postfix["val"] = f"{row['val_loss']:.3f}"
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif due or "val_loss" in row:
            emit(format_step(row, self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summed_load(rows: list[dict[str, Any]], last: int = 0) -> dict[str, list[int]]:
    """Per MoE layer: tokens routed to each expert, summed over the last `last` rows (0 = all)."""
    totals: dict[str, list[int]] = {}
    for row in rows[-last:] if last else rows:
        for layer, counts in (row.get("expert_load") or {}).items():
            acc = totals.setdefault(layer, [0] * len(counts))
            totals[layer] = [a + int(c) for a, c in zip(acc, counts)]
    return totals


def expert_load_flags(counts: list[int]) -> dict[str, list[int]]:
    """Dead (< DEAD_SHARE x uniform) and overloaded (> OVERLOAD_SHARE x uniform) experts of
    one layer's routed-token counts; the uniform share is the mean count."""
    uniform = sum(counts) / max(len(counts), 1)
    if not uniform:
        return {"dead": [], "overloaded": []}
    return {
        "dead": [i for i, c in enumerate(counts) if c < DEAD_SHARE * uniform],
        "overloaded": [i for i, c in enumerate(counts) if c > OVERLOAD_SHARE * uniform],
    }


def expert_load_table(rows: list[dict[str, Any]], last: int = 0) -> list[str]:
    """Console lines: per layer, each expert's share of routed tokens (x uniform) and flags."""
    lines = []
    for layer, counts in summed_load(rows, last).items():
        uniform = sum(counts) / max(len(counts), 1) or 1.0
        shares = " ".join(f"{c / uniform:4.2f}" for c in counts)
        flags = expert_load_flags(counts)
        marks = [f"{kind.upper()} {flags[kind]}" for kind in ("dead", "overloaded") if flags[kind]]
        note = f"  <- {'; '.join(marks)}" if marks else ""
        lines.append(f"  layer {layer:>3}: {shares}{note}")
    return lines


def summarize(rows: list[dict[str, Any]], out_dir: Path, checkpoint: Path | None) -> list[str]:
    """The end-of-run summary: final loss, val loss, expert load, where the files are."""
    lines = []
    if rows:
        last = rows[-1]
        val = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
        mean_tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
        lines.append(
            f"moefold: done at step {last['step']}: loss {last['loss']:.4f}"
            + (f", val loss {val:.4f}" if val is not None else "")
            + f", {mean_tps:.0f} tok/s mean over {len(rows)} steps"
        )
        table = expert_load_table(rows, last=max(1, len(rows) // 4))
        if table:
            lines.append(
                "expert load over the last quarter of the run, x uniform share per expert "
                f"(dead < {DEAD_SHARE}, overloaded > {OVERLOAD_SHARE}):"
            )
            lines += table
    else:
        lines.append("moefold: no steps trained")
    lines.append(f"metrics:    {out_dir / 'metrics.jsonl'}")
    if checkpoint is not None:
        lines.append(f"checkpoint: {checkpoint}")
    lines.append(f"report:     moefold report {out_dir}")
    return lines
