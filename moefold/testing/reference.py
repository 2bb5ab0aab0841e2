"""Single-process oracles for parallel tests: tolerances, full gradients from shards, and a
one-rank reference run of the real trainer.

Tolerances (docs/testing.md): exact where only data moves; fp32 with another reduction order:
loss rtol 1e-5, gradients rtol 1e-4 / atol 1e-6.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moefold.config import JobConfig
from moefold.parallel.data_parallel import parameter_shards
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import ParallelGroups, build_parallel_groups

LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def gather_full(tensor: torch.Tensor, shards, groups: ParallelGroups) -> torch.Tensor:
    """Undo the cuts recorded on a parameter (innermost first) with plain all-gathers."""
    for family, dim in reversed(shards):
        size = groups.size(family)
        if size == 1:
            continue
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=groups.group(family))
        tensor = torch.cat(parts, dim=dim)
    return tensor


def full_state(
    model: nn.Module, groups: ParallelGroups, local: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every parameter's `local` tensor (its value or gradient, as this rank holds it) as the
    full single-process tensor, on every rank of the stage. Collective over the shard groups."""
    out = {}
    for name, param in model.named_parameters():
        out[name] = gather_full(local[name].detach(), parameter_shards(param), groups).clone()
    if groups.size("pp") > 1:  # pipeline stages hold disjoint parameters: merge them
        parts: list = [None] * groups.size("pp")
        dist.all_gather_object(parts, out, group=groups.group("pp"))
        out = {name: value for part in parts for name, value in part.items()}
    return out


def build_test_trainer(job: JobConfig, groups: ParallelGroups):
    from moefold.train.launch import build_trainer

    out_dir = Path(tempfile.mkdtemp(prefix="moefold-test-"))
    return build_trainer(job, groups, out_dir, torch.device("cpu"))


def run_steps(job: JobConfig, groups: ParallelGroups, steps: int) -> dict:
    """Train `steps` steps; returns losses, the step-1 full gradients and final parameters."""
    trainer = build_test_trainer(job, groups)
    losses, grad_norms, grads = [], [], None
    for step in range(steps):
        local_loss = trainer.compute_gradients()
        if step == 0:
            grads = full_state(trainer.model, groups, trainer.optimizer.reduced_gradients())
        grad_norm = trainer.apply_gradients()
        row = trainer.step_metrics(local_loss, grad_norm, 0.0)
        losses.append(row["loss"])
        grad_norms.append(row["grad_norm"])
    values = {name: param.detach() for name, param in trainer.model.named_parameters()}
    params = full_state(trainer.model, groups, values)
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "grads": grads,
        "params": params,
        "last_row": row,
    }


def single_process_reference(job: JobConfig, steps: int) -> dict:
    """The same job on one rank in this process (a private one-rank gloo group)."""
    assert not dist.is_initialized(), "reference runs need a process without a process group"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layout = ParallelLayout.build(1)
        return run_steps(job, build_parallel_groups(layout), steps)
    finally:
        dist.destroy_process_group()
