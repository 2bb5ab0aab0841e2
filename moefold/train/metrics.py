"""Per-step metrics: one JSON object per optimizer step in OUT/metrics.jsonl, a progress bar,
and TensorBoard events when `tensorboard` is installed. Only the logging rank writes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def print0(is_logging_rank: bool, *args: Any) -> None:
    """print on the logging rank only (nanochat's print0)."""
    if is_logging_rank:
        print(*args, flush=True)


class MetricsWriter:
    """Appends metrics rows; on resume, rows at or after the resume step are dropped first so
    the file always reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tensorboard = None

    def _truncate_after(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(row + "\n" for row in kept))
        tmp.replace(self.path)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=False) + "\n")
        if self._tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "step":
                    self._tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
