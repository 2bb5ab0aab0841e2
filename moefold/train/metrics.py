"""Per-step metrics: one JSON object per optimizer step in OUT/metrics.jsonl, a progress bar,
and TensorBoard events when `tensorboard` is installed. Only the logging rank writes.

Rows are strict JSON (RFC 8259 has no NaN or Infinity): a non-finite number is written as null
and its key (dotted for nested values, e.g. "dropped_frac.1") listed in the row's "nonfinite".
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moefold.errors import RunFolderError
from moefold.safe_io import atomic_write_text, describe_os_error

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
        atomic_write_text(self.path, "".join(row + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(strict_json_row(row), allow_nan=False) + "\n"
        # One write of a whole line on an O_APPEND descriptor: a crash leaves whole rows only.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        except OSError as error:
            raise RunFolderError(describe_os_error(self.path, error)) from error
        finally:
            os.close(fd)
        if self._tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "step":
                    self._tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def strict_json_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row with non-finite floats as None and their keys listed under "nonfinite"."""
    flagged: list[str] = []

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            flagged.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    cleaned = clean(row, "")
    if flagged:
        cleaned["nonfinite"] = flagged
    return cleaned


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def step_router_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sums of the routers' aux-loss and z-loss shares over the step."""
    aux, z = torch.zeros(()), torch.zeros(())
    for layer in model.moe_layers():
        aux = aux + layer.router.step_aux_loss.detach().float().cpu()
        z = z + layer.router.step_z_loss.detach().float().cpu()
    return aux, z


def expert_load_metrics(
    model: nn.Module, num_layers: int, sum_over_model: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, Any]:
    """Per MoE layer: tokens routed to each expert over the global batch, dropped fraction.

    A dense [layers, E] table, filled by the ranks that hold each layer, summed over all ranks
    (one collective whatever the pipeline split)."""
    moe_layers = {
        name.split(".")[1]: m
        for name, m in model.named_modules()
        if name.startswith("layers.") and hasattr(m, "router") and hasattr(m, "stats")
    }
    all_moe = [
        str(i)
        for i in range(num_layers)
        if getattr(model, "moe_cfg", None) and model.moe_cfg.is_moe_layer(i)
    ]
    if not all_moe:
        return {}
    num_experts = int(model.moe_cfg.num_experts)
    table = torch.zeros(len(all_moe), num_experts + 2, dtype=torch.float64)
    for row, name in enumerate(all_moe):
        if name in moe_layers:
            layer = moe_layers[name]
            table[row, :num_experts] = layer.router.step_tokens_per_expert.double().cpu()
            table[row, num_experts] = float(layer.stats.dropped)
            table[row, num_experts + 1] = float(layer.stats.routed)
    table = sum_over_model(table)
    load = {
        name: [int(c) for c in table[row, :num_experts].tolist()]
        for row, name in enumerate(all_moe)
    }
    dropped = {
        name: float(table[row, num_experts] / max(float(table[row, num_experts + 1]), 1.0))
        for row, name in enumerate(all_moe)
    }
    return {"expert_load": load, "dropped_frac": dropped}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: allocator peak on CUDA, process peak RSS on CPU (which
    includes the Python/torch runtime, about 0.3-0.4 GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
