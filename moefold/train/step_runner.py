"""How one rank runs forward/backward over its micro-batches: directly (pp = 1) or through a
torch.distributed.pipelining schedule (pp > 1). The trainer talks to either the same way.

Both return the SUM over this rank's micro-batches of the token-mean loss of its tokens; under
pipelining only ranks holding the last stage see a loss (others return 0), and the trainer's
metrics sum over the pp group.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from moefold.schedules import StageShapes, build_schedule

Shard = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def token_mean_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten())


class LocalRunner:
    """pp = 1: one forward and backward per micro-batch (gradient accumulation)."""

    def __init__(
        self,
        model: nn.Module,
        shard: Shard,
        autocast: Callable[[], AbstractContextManager],
        loss_scale: float,
    ) -> None:
        self.model, self.shard, self.autocast, self.loss_scale = model, shard, autocast, loss_scale

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())
        for batch in micro_batches:
            inputs, labels = self.shard(batch)
            with self.autocast():
                loss = token_mean_loss(self.model(inputs), labels)
            (loss * self.loss_scale).backward()
            total += loss.detach().float().cpu()
        return total

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())
        for batch in micro_batches:
            inputs, labels = self.shard(batch)
            with self.autocast():
                total += token_mean_loss(self.model(inputs), labels).float().cpu()
        return total


class PipelineRunner:
    """pp > 1: the configured schedule over this rank's stages (scale_grads=False, see
    moefold/schedules.py for the loss-scaling contract)."""

    def __init__(
        self,
        stage_modules,
        groups,
        schedule_name: str,
        num_microbatches: int,
        num_eval_microbatches: int,
        shard: Shard,
        autocast: Callable[[], AbstractContextManager],
        loss_scale: float,
        device: torch.device,
        shapes: StageShapes,
    ) -> None:
        self.shard, self.autocast, self.loss_scale = shard, autocast, loss_scale
        indices = [index for index, _ in stage_modules]
        num_stages = groups.size("pp") * len(stage_modules)
        self.has_first, self.has_last = 0 in indices, num_stages - 1 in indices
        self.stats = groups.comm_stats
        self.p2p_bytes_per_step = pipeline_p2p_bytes(
            indices, num_stages, num_microbatches, shapes.boundary_bytes()
        )

        def scaled_loss(logits, labels):
            return token_mean_loss(logits, labels) * loss_scale

        self.schedule = build_schedule(
            stage_modules, schedule_name, num_microbatches, scaled_loss, groups, device, shapes
        )
        # A forward-only schedule for validation, with its own stages (buffer sizes differ).
        eval_schedule_name = "gpipe" if len(stage_modules) == 1 else schedule_name
        self.eval_schedule = build_schedule(
            stage_modules,
            eval_schedule_name,
            num_eval_microbatches,
            token_mean_loss,
            groups,
            device,
            shapes,
        )

    def _run(self, schedule, micro_batches, train: bool) -> torch.Tensor:
        pieces = [self.shard(batch) for batch in micro_batches]
        inputs = torch.cat([p[0] for p in pieces])
        labels = torch.cat([p[1] for p in pieces])
        args = (inputs,) if self.has_first else ()
        target = labels if self.has_last else None
        losses: list[torch.Tensor] = []
        with self.autocast():
            if train:
                schedule.step(*args, target=target, losses=losses)
            else:
                schedule.eval(*args, target=target, losses=losses)
        if not losses:
            return torch.zeros(())
        total = torch.stack([loss.detach().float().cpu() for loss in losses]).sum()
        return total / self.loss_scale if train else total

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        # The schedule's send/recv run inside torch.distributed.pipelining, not parallel/comm.py:
        # count them here, analytically, as comm.py counts its collectives.
        self.stats.add("pp", self.p2p_bytes_per_step)
        return self._run(self.schedule, micro_batches, train=True)

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        return self._run(self.eval_schedule, micro_batches, train=False)


def pipeline_p2p_bytes(
    stage_indices: list[int], num_stages: int, num_microbatches: int, boundary_bytes: int
) -> int:
    """Bytes this pp rank sends in one training step: each of its stages sends every
    micro-batch's activation downstream (unless it is the last stage) and the gradient of its
    input upstream (unless it is the first); one boundary tensor each way."""
    sends = sum((index < num_stages - 1) + (index > 0) for index in stage_indices)
    return sends * num_microbatches * boundary_bytes
