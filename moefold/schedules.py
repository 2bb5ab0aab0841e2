"""Pipeline schedules from torch.distributed.pipelining, and the loss-scaling contract.

Contract: the schedules are built with scale_grads=False. The loss function returns the
micro-batch's token-mean loss times the trainer's `loss_scale` (1 / (M * tp * cp), M = global
micro-batches), exactly the factor the non-pipelined path multiplies by before backward, so
the gradients are identical. Routers inject their aux-loss gradient (scale 1 / M) inside
backward, which the schedule runs on every stage; no loss travels between stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from moefold.parallel.mesh import ParallelGroups

SCHEDULES = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


@dataclass(frozen=True)
class StageShapes:
    """Shapes and dtypes that cross stage boundaries for one micro-batch.

    Given up front, the stages run in the library's static mode: no metadata-inference forward
    pass, which would otherwise run the routers (and their dispatcher collectives and step
    statistics) once more than the schedule does.
    """

    micro_batch: int
    local_seq_len: int
    hidden: int
    vocab_size: int
    logits_dtype: torch.dtype
    # model.mtp_depths: ids [B, S, 1+D] in, the D depths' embeddings carried beside the hidden
    # state, logits [B, S, 1+D, V] out (moefold/model/mtp.py)
    mtp_depths: int = 0
    # the hidden state's dtype: the parameters' (bf16 under train.dtype=bf16, as Megatron's
    # pipeline_dtype), so a stage receives exactly the bytes its neighbour sends
    hidden_dtype: torch.dtype = torch.float32

    @property
    def boundary_width(self) -> int:
        return self.hidden * (1 + self.mtp_depths)

    def example_input(self, first: bool, device: torch.device) -> torch.Tensor:
        ids: tuple[int, ...] = (self.micro_batch, self.local_seq_len)
        if self.mtp_depths:
            ids += (1 + self.mtp_depths,)
        if first:
            return torch.zeros(ids, dtype=torch.long, device=device)
        # requires_grad tells the stage to send the gradient of its input back upstream
        shape = (self.micro_batch, self.local_seq_len, self.boundary_width)
        return torch.empty(shape, dtype=self.hidden_dtype, device=device).requires_grad_()

    def boundary_bytes(self) -> int:
        """Bytes of one hidden-state tensor crossing a stage boundary (either direction)."""
        element = torch.empty((), dtype=self.hidden_dtype).element_size()
        return self.micro_batch * self.local_seq_len * self.boundary_width * element

    def example_output(self, last: bool, device: torch.device) -> torch.Tensor:
        if last:
            depths = (1 + self.mtp_depths,) * (self.mtp_depths > 0)
            return torch.empty(
                (self.micro_batch, self.local_seq_len, *depths, self.vocab_size),
                dtype=self.logits_dtype,
                device=device,
            )
        shape = (self.micro_batch, self.local_seq_len, self.boundary_width)
        return torch.empty(shape, dtype=self.hidden_dtype, device=device)


def build_schedule(
    stage_modules: list,
    schedule_name: str,
    num_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    groups: ParallelGroups,
    device: torch.device,
    shapes: StageShapes,
):
    """One schedule over this rank's stages (one stage unless interleaved)."""
    num_stages = groups.size("pp") * len(stage_modules)
    stages = []
    for index, module in stage_modules:
        first, last = index == 0, index == num_stages - 1
        output = shapes.example_output(last, device)
        hidden_input = shapes.example_input(False, device).detach()
        stages.append(
            PipelineStage(
                module,
                index,
                num_stages,
                device,
                group=groups.group("pp"),
                input_args=shapes.example_input(first, device),
                output_args=output,
                output_grads=None if last else output,
                input_grads=None if first else hidden_input,
            )
        )
    cls = SCHEDULES[schedule_name]
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, num_microbatches, loss_fn=loss_fn, scale_grads=False)
    assert len(stages) == 1, "non-interleaved schedules run one stage per rank"
    return cls(stages[0], num_microbatches, loss_fn=loss_fn, scale_grads=False)
