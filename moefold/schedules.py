"""Pipeline schedules from torch.distributed.pipelining, and the loss-scaling contract.

Contract: the schedules are built with scale_grads=False. The loss function returns the
micro-batch's token-mean loss times the trainer's `loss_scale` (1 / (M * tp * cp), M = global
micro-batches), exactly the factor the non-pipelined path multiplies by before backward, so
the gradients are identical. Routers inject their aux-loss gradient (scale 1 / M) inside
backward, which the schedule runs on every stage; no loss travels between stages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from moefold.parallel.mesh import ParallelGroups

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


def build_schedule(
    stage_modules: list,
    schedule_name: str,
    num_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    groups: ParallelGroups,
    device: torch.device,
):
    """One schedule over this rank's stages (one stage unless interleaved)."""
    num_stages = groups.size("pp") * len(stage_modules)
    stages = [
        PipelineStage(module, index, num_stages, device, group=groups.group("pp"))
        for index, module in stage_modules
    ]
    cls = SCHEDULES[schedule_name]
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, num_microbatches, loss_fn=loss_fn, scale_grads=False)
    assert len(stages) == 1, "non-interleaved schedules run one stage per rank"
    return cls(stages[0], num_microbatches, loss_fn=loss_fn, scale_grads=False)
