"""Gradient families: the group each parameter's gradient is summed over, and the global grad norm.

Families (every parameter belongs to exactly one; `parameter_family` decides):
- "expert":     routed-expert weights; distinct over ep x etp, replicas over edp
                -> gradients summed over edp.
- "tensor":     weights sharded by tensor parallelism; each tp rank already saw every token of
                its tp group (sequence-parallel all-gather), replicas over dp x cp
                -> gradients summed over dp x cp.
- "replicated": everything else (norms, embedding, LM head, router, shared-expert gate): each
                tp/cp rank saw only its own token slice -> gradients summed over dp x cp x tp.
The trainer scales each rank's loss so that these sums equal the single-process gradient;
the optimizers run the sums in buckets (moefold/parallel/grad_buckets.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moefold.model.experts import GroupedExperts
from moefold.parallel.mesh import ParallelGroups
from moefold.parallel.mixed_precision import grad_of

FAMILY_ATTR = "moefold_family"
REDUCE_GROUP = {"expert": "edp", "tensor": "dp_cp", "replicated": "dp_cp_tp"}
# Group over which a family's gradient shards are distinct (summed once in the norm).
DISTINCT_GROUP = {"expert": "ep_etp", "tensor": "tp", "replicated": None}


SHARDS_ATTR = "moefold_shards"


def mark_family(param: nn.Parameter, family: str, shards: tuple[tuple[str, int], ...] = ()) -> None:
    """Record the family and how the full tensor was cut: ((group family, tensor dim), ...),
    outermost cut first, e.g. (("ep", 0), ("etp", 2)) for an expert gate projection."""
    assert family in REDUCE_GROUP, family
    setattr(param, FAMILY_ATTR, family)
    setattr(param, SHARDS_ATTR, tuple(shards))


def parameter_shards(param: nn.Parameter) -> tuple[tuple[str, int], ...]:
    return getattr(param, SHARDS_ATTR, ())


def parameter_family(param: nn.Parameter) -> str:
    return getattr(param, FAMILY_ATTR, "replicated")


def mark_expert_parameters(model: nn.Module) -> None:
    """Expert weights are recognised by their module, at any expert-parallel size."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            for name, param in module.named_parameters():
                ffn_dim = 1 if name == "down_proj" else 2
                mark_family(param, "expert", (("ep", 0), ("etp", ffn_dim)))


def _params_by_family(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    by_family: dict[str, list[nn.Parameter]] = {family: [] for family in REDUCE_GROUP}
    for param in model.parameters():
        if grad_of(param) is not None:
            by_family[parameter_family(param)].append(param)
    return by_family


def grad_sum_of_squares(model: nn.Module, groups: ParallelGroups) -> torch.Tensor:
    """Sum of squares of the full (single-process) gradient, counting each shard once."""
    total = torch.zeros((), dtype=torch.float32)
    for family, params in _params_by_family(model).items():
        local = torch.zeros((), dtype=torch.float32)
        if params:  # one norm pass per gradient, no squared copy of each (get_total_norm)
            grads = [grad_of(param).detach() for param in params]
            local += torch.nn.utils.get_total_norm(grads).float().square().cpu()
        distinct = DISTINCT_GROUP[family]
        if distinct is not None and groups.size(distinct) > 1:
            dist.all_reduce(local, group=groups.group(distinct))
        total += local
    if groups.size("pp") > 1:
        dist.all_reduce(total, group=groups.group("pp"))
    return total
