"""parallelize_model: apply every parallelism to a full single-device model, in one order.

apply_tp -> apply_cp -> apply_ep -> split_for_pipeline -> parameter families for data
parallelism. Each step is the identity when its degree is 1, so world size 1 runs the same
path.
"""

from __future__ import annotations

from moefold.config import JobConfig
from moefold.model.transformer import SequencePositions, Transformer
from moefold.parallel.context_parallel import apply_cp
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
