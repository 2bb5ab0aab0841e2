"""How one rank runs forward/backward over its micro-batches: directly (pp = 1) or through a
torch.distributed.pipelining schedule (pp > 1). The trainer talks to either the same way.

Both return the SUM over this rank's micro-batches of the token-mean loss of its tokens; under
pipelining only ranks holding the last stage see a loss (others return 0), and the trainer's
metrics sum over the pp group. With MTP (model.mtp_depths) the optimised loss is the main loss
plus train.mtp_loss_coeff times the mean depth loss (TrainingLoss); the runners return the
main loss and keep the MTP loss for the metrics (`take_mtp_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from moefold.model.mtp import mtp_depth_losses
from moefold.schedules import StageShapes, build_schedule

Shard = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def token_mean_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten())


class TrainingLoss:
    """scale * (main + mtp_coeff * mean MTP depth loss) of one micro-batch; logits [B, S, V]
    (no MTP) or [B, S, 1+D, V] with labels [B, S, 1+D] (model/mtp.py). Sums the unscaled
    main and MTP losses it sees, detached, for the runner to report."""

    def __init__(self, mtp_coeff: float, scale: float = 1.0) -> None:
        self.mtp_coeff, self.scale = mtp_coeff, scale
        self.main_sum, self.mtp_sum = torch.zeros(()), torch.zeros(())

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3:
            loss = token_mean_loss(logits, labels)
            self.main_sum += loss.detach().float().cpu()
            return loss * self.scale
        main = token_mean_loss(logits[:, :, 0], labels[..., 0])
        mtp = mtp_depth_losses(logits, labels).mean()
        self.main_sum += main.detach().float().cpu()
        self.mtp_sum += mtp.detach().float().cpu()
        return (main + self.mtp_coeff * mtp) * self.scale

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(main, MTP) sums since the last take; resets them."""
        sums = self.main_sum, self.mtp_sum
        self.main_sum, self.mtp_sum = torch.zeros(()), torch.zeros(())
        return sums


class LocalRunner:
    """pp = 1: one forward and backward per micro-batch (gradient accumulation)."""

    def __init__(
        self,
        model: nn.Module,
        shard: Shard,
        autocast: Callable[[], AbstractContextManager],
        loss_scale: float,
        mtp_coeff: float = 0.0,
    ) -> None:
        self.model, self.shard, self.autocast, self.loss_scale = model, shard, autocast, loss_scale
        self.loss = TrainingLoss(mtp_coeff, loss_scale)
        self.mtp_loss = torch.zeros(())

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        for batch in micro_batches:
            inputs, labels = self.shard(batch)
            with self.autocast():
                loss = self.loss(self.model(inputs), labels)
            loss.backward()
        total, self.mtp_loss = self.loss.take()
        return total

    def take_mtp_loss(self) -> torch.Tensor:
        """Sum over the last training step's micro-batches of the mean MTP depth loss."""
        return self.mtp_loss

    @torch.no_grad()
    def evaluate(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        losses = TrainingLoss(0.0)
        for batch in micro_batches:
            inputs, labels = self.shard(batch)
            with self.autocast():
                losses(self.model(inputs), labels)
        return losses.take()[0]


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
        mtp_coeff: float = 0.0,
    ) -> None:
        self.shard, self.autocast, self.loss_scale = shard, autocast, loss_scale
        self.train_loss, self.eval_loss = TrainingLoss(mtp_coeff, loss_scale), TrainingLoss(0.0)
        self.mtp_loss = torch.zeros(())
        indices = [index for index, _ in stage_modules]
        num_stages = groups.size("pp") * len(stage_modules)
        self.has_first, self.has_last = 0 in indices, num_stages - 1 in indices
        self.stats = groups.comm_stats
        self.p2p_bytes_per_step = pipeline_p2p_bytes(
            indices, num_stages, num_microbatches, shapes.boundary_bytes()
        )

        self.schedule = build_schedule(
            stage_modules, schedule_name, num_microbatches, self.train_loss, groups, device, shapes
        )
        # A forward-only schedule for validation, with its own stages (buffer sizes differ).
        eval_schedule_name = "gpipe" if len(stage_modules) == 1 else schedule_name
        self.eval_schedule = build_schedule(
            stage_modules,
            eval_schedule_name,
            num_eval_microbatches,
            self.eval_loss,
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
        with self.autocast():
            # return_outputs=False: the losses come through the loss function, and a last stage
            # that keeps every micro-batch's logits for a merged output holds them all at once
            # (and their concatenation): 37 GiB on Qwen2-57B's last stage (docs/dry_run.md)
            if train:
                schedule.step(*args, target=target, return_outputs=False)
            else:
                schedule.eval(*args, target=target, return_outputs=False)
        # Ranks without the last stage never call the loss: their sums stay 0.
        main, mtp = (self.train_loss if train else self.eval_loss).take()
        if train:
            self.mtp_loss = mtp
        return main

    def take_mtp_loss(self) -> torch.Tensor:
        """Sum over the last training step's micro-batches of the mean MTP depth loss."""
        return self.mtp_loss

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
