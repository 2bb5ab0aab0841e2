"""Optional experiment loggers fed with each metrics row: TensorBoard (the `tensorboard` extra)
gets the MoE metrics that metrics.jsonl holds as nested dicts (per-layer expert load as a
histogram plus min / max / dead-expert scalars, dropped fraction per layer, bytes per
communication family); Weights & Biases gets the whole row when train.wandb_project is set.

Top-level scalars (loss, lr, tokens/s...) go to TensorBoard through MetricsWriter; this writer
adds its own event file to the same folder, so TensorBoard shows one run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from moefold.train.progress import DEAD_SHARE

logger = logging.getLogger(__name__)


def moe_scalars(row: dict[str, Any]) -> dict[str, float]:
    """Flat `tag -> value` of the row's MoE and communication metrics."""
    out: dict[str, float] = {}
    for layer, counts in (row.get("expert_load") or {}).items():
        uniform = sum(counts) / max(len(counts), 1)
        if not uniform:
            continue
        shares = [c / uniform for c in counts]
        out[f"expert_load_max/layer_{layer}"] = max(shares)
        out[f"expert_load_min/layer_{layer}"] = min(shares)
        out[f"experts_dead/layer_{layer}"] = float(sum(s < DEAD_SHARE for s in shares))
    for layer, value in (row.get("dropped_frac") or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"dropped_frac/layer_{layer}"] = float(value)
    for family, value in (row.get("comm_bytes") or {}).items():
        out[f"comm_bytes/{family}"] = float(value)
    return out


def expert_shares(row: dict[str, Any]) -> dict[str, list[float]]:
    """Per layer: each expert's routed tokens as a multiple of the uniform share."""
    out = {}
    for layer, counts in (row.get("expert_load") or {}).items():
        uniform = sum(counts) / max(len(counts), 1) or 1.0
        out[layer] = [c / uniform for c in counts]
    return out


class TensorBoardLogger:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=".moe")

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for tag, value in moe_scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        for layer, shares in expert_shares(row).items():
            # one value per expert: the histogram over steps shows the load spreading or not
            self.writer.add_histogram(f"expert_load/layer_{layer}", np.asarray(shares), step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, project: str, out_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=out_dir.name, dir=str(out_dir), config=config)

    def log(self, row: dict[str, Any]) -> None:
        values: dict[str, Any] = {
            k: v
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        values.update(moe_scalars(row))
        for layer, shares in expert_shares(row).items():
            values[f"expert_load/layer_{layer}"] = self.wandb.Histogram(shares)
        self.run.log(values, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class ExperimentLoggers:
    """Every optional logger that is installed and asked for; nothing on other ranks."""

    def __init__(
        self, out_dir: Path, enabled: bool, wandb_project: str = "", config: dict | None = None
    ) -> None:
        self.loggers: list[Any] = []
        if not enabled:
            return
        try:
            self.loggers.append(TensorBoardLogger(out_dir / "tensorboard"))
        except ImportError:  # the `tensorboard` extra is optional
            pass
        if wandb_project:
            try:
                self.loggers.append(WandbLogger(wandb_project, out_dir, config or {}))
            except ImportError:
                logger.warning(
                    "train.wandb_project=%s but wandb is not installed (pip install wandb); "
                    "not logging to Weights & Biases",
                    wandb_project,
                )

    def log(self, row: dict[str, Any]) -> None:
        for item in self.loggers:
            item.log(row)

    def close(self) -> None:
        for item in self.loggers:
            item.close()
