"""Each dispatcher against the LocalDispatcher reference on real gloo ranks.

Every rank owns distinct tokens. The reference is the full (all-expert) MoE layer applied by
each rank to its own tokens; capacity is decided per source rank in both, so outputs, input
gradients and expert-weight gradients (summed over ranks) must agree, dropless or dropping,
including a rank that receives no rows, empty experts and all tokens on one expert.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from moefold.config import MoEConfig
from moefold.parallel.expert_parallel import apply_ep, expert_shard
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from tests.dist.moe_cases import make_layer, tokens


def body(rank, world_size, cfg_kwargs, ep, etp, routing):
    cfg = MoEConfig(num_experts=8, topk=2, ffn_hidden=12, **cfg_kwargs)
    layout = ParallelLayout.build(world_size, ep=ep, etp=etp)
    groups = build_parallel_groups(layout)
    reference = make_layer(cfg, routing == "one-expert")
    layer = copy.deepcopy(reference)
    apply_ep(layer, groups)

    x_ref, x = tokens(rank, routing == "one-expert"), tokens(rank, routing == "one-expert")
    out_ref, out = reference(x_ref), layer(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + rank))
    out_ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)

    experts_slice, ffn_slice = expert_shard(8, 12, groups)
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(reference.experts, name).grad.clone()
        dist.all_reduce(full)  # every rank's tokens contribute to the experts' gradient
        want = (
            full[experts_slice][:, :, ffn_slice]
            if name != "down_proj"
            else full[experts_slice][:, ffn_slice]
        )
        # Expert grads are complete only after summing over edp (the other token owners).
        got = getattr(layer.experts, name).grad.clone()
        dist.all_reduce(got, group=groups.group("edp"))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    return float(layer.stats.dropped)


CASES = {
    "dropless": {},
    "capacity-probs": {"capacity_factor": 1.0},
    "capacity-position": {"capacity_factor": 0.5, "drop_policy": "position"},
    "capacity-padded": {"capacity_factor": 1.0, "pad_to_capacity": True},
}
LAYOUTS = {
    "ep2": (2, 2, 1),
    "ep4": (4, 4, 1),
    "ep2-etp2": (4, 2, 2),
    "etp2": (2, 1, 2),
    "ep4-etp2": (8, 4, 2),
}


@pytest.mark.dist
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("layout", ["ep2", "ep2-etp2", "ep4-etp2"])
def test_dispatcher_matches_local_reference(dispatcher, case, layout):
    world, ep, etp = LAYOUTS[layout]
    kwargs = {**CASES[case], "dispatcher": dispatcher}
    run_ranks(body, world, kwargs, ep, etp, "random", timeout=120)


@pytest.mark.dist
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("case", ["dropless", "capacity-padded"])
def test_all_tokens_to_one_expert_and_idle_ranks(dispatcher, case):
    # Experts 0 and 1 live on ep rank 0: ranks 1-3 receive no rows at all.
    kwargs = {**CASES[case], "dispatcher": dispatcher}
    dropped = run_ranks(body, 4, kwargs, 4, 1, "one-expert", timeout=120)
    if case == "capacity-padded":
        assert all(d > 0 for d in dropped)
