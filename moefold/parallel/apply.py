"""parallelize_model: apply every parallelism to a full single-device model, in one order.

apply_tp -> apply_cp -> apply_ep -> split_for_pipeline -> parameter families for data
parallelism. Each step is the identity when its degree is 1, so world size 1 runs the same
path.

`shard_index(groups)` reads back the cuts apply_tp/apply_ep record on each parameter (family,
dim; contiguous blocks by group coordinate), so a meta-device model sharded here can be
materialised with exactly its slices of the single-process values (moefold/model/init.py).
"""

from __future__ import annotations

import torch

from moefold.config import JobConfig
from moefold.model.init import Index, ShardIndex
from moefold.model.transformer import SequencePositions, Transformer
from moefold.parallel.context_parallel import apply_cp
from moefold.parallel.data_parallel import parameter_shards
from moefold.parallel.expert_parallel import apply_ep
from moefold.parallel.mesh import ParallelGroups
from moefold.parallel.pipeline import StageModule, split_for_pipeline
from moefold.parallel.router_stats import bind_router_stats
from moefold.parallel.tensor_parallel import apply_tp


def parallelize_model(
    model: Transformer, job: JobConfig, groups: ParallelGroups
) -> tuple[Transformer, list[tuple[int, StageModule]]]:
    """Returns this rank's part of the model and its pipeline stages (one at pp = 1)."""
    model.positions = SequencePositions(
        groups.size("cp"), groups.coord("cp"), groups.size("tp"), groups.coord("tp")
    )
    apply_tp(model, groups)
    apply_cp(model, groups)
    bind_router_stats(model, groups)
    apply_ep(model, groups)
    stages = split_for_pipeline(model, job.parallel, groups)
    return model, stages


def shard_index(groups: ParallelGroups) -> ShardIndex:
    """name, local parameter -> (full shape, this rank's index in it), from the recorded cuts
    (outermost first; each cut keeps the block of its group coordinate)."""

    def index_of(_name: str, param: torch.Tensor) -> tuple[torch.Size, Index]:
        shape = list(param.shape)
        start = [0] * len(shape)
        for family, dim in reversed(parameter_shards(param)):  # innermost cut first
            start[dim] += groups.coord(family) * shape[dim]
            shape[dim] *= groups.size(family)
        index = tuple(slice(b, b + n) for b, n in zip(start, param.shape))
        return torch.Size(shape), index

    return index_of
