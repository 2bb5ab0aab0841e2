"""Test-only harness: Megatron-Core 0.16.1's own TopKRouter and moe_utils, run on CPU.

Megatron's router is written for CUDA in three places, none of them routing math:
- it allocates buffers and moves its weight to `torch.cuda.current_device()`: while a
  `megatron_cpu()` block runs, that function returns "cpu";
- it wraps `TopKRouter._apply_expert_bias` in its jit fuser (torch.compile) when the module is
  imported: `megatron.core.jit.disable_jit_fuser()` runs first, so the method stays plain Python
  (an already-compiled method is unwrapped to the function it wraps);
- it sums token counts over its tp / cp / dp process groups: a one-rank gloo group (in-memory
  store) stands for each of them, on which Megatron's own reductions are the identity;
- `router_gating_linear` tests `te_general_gemm is not None`, a name moe_utils defines only when
  Transformer Engine imports (0.16.1 raises NameError without TE): the harness sets it to None,
  which selects Megatron's own torch.mm path in the router dtype.
Everything else - `TransformerConfig` validation, `TopKRouter.routing` / `forward`, the
`moe_utils` functions - is Megatron's code as installed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moefold.config import MoEConfig

# Megatron warns at import and config time about what CPU runs lack (Transformer Engine, Apex,
# deprecated defaults): noise for these tests.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    megatron_jit = pytest.importorskip("megatron.core.jit", reason="needs the test extra")
    megatron_jit.disable_jit_fuser()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe import router as megatron_router
    from megatron.core.transformer.transformer_config import TransformerConfig

if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None
_compiled = megatron_router.TopKRouter._apply_expert_bias
megatron_router.TopKRouter._apply_expert_bias = getattr(
    _compiled, "_torchdynamo_orig_callable", _compiled
)

AUX_NAMES = {"aux": "aux_loss", "seq_aux": "seq_aux_loss", "global_aux": "global_aux_loss"}
TRACKER_NAMES = {
    "aux": "load_balancing_loss",
    "seq_aux": "seq_load_balancing_loss",
    "global_aux": "global_load_balancing_loss",
}


@contextlib.contextmanager
def megatron_cpu() -> Iterator[dist.ProcessGroup]:
    """One-rank gloo group and `torch.cuda.current_device() == "cpu"` for the block."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield dist.group.WORLD
    finally:
        torch.cuda.current_device = saved
        if created:
            dist.destroy_process_group()


def megatron_kwargs(cfg: MoEConfig) -> dict[str, Any]:
    """TransformerConfig MoE fields equal to a moefold MoEConfig (the options both have)."""
    if cfg.norm_topk_prob and cfg.score == "softmax":
        raise ValueError("norm_topk_prob with softmax scores has no Megatron-Core equivalent")
    if cfg.score == "sigmoid" and cfg.topk > 1 and not cfg.norm_topk_prob:
        raise ValueError("Megatron-Core always renormalises sigmoid top-k (norm_topk_prob=true)")
    coeff = cfg.aux_loss_coeff if cfg.aux_loss != "none" else 0.0
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_router_score_function=cfg.score,
        moe_router_pre_softmax=cfg.pre_softmax,
        moe_router_topk_scaling_factor=cfg.scaling_factor if cfg.scaling_factor != 1.0 else None,
        moe_router_num_groups=cfg.num_groups or None,
        moe_router_group_topk=cfg.group_topk or None,
        moe_router_load_balancing_type=AUX_NAMES.get(cfg.aux_loss, "none"),
        moe_aux_loss_coeff=coeff,
        moe_z_loss_coeff=cfg.z_loss_coeff or None,
        moe_router_enable_expert_bias=cfg.expert_bias,
        moe_router_bias_update_rate=cfg.expert_bias_rate,
        moe_expert_capacity_factor=cfg.capacity_factor,
        moe_pad_expert_input_to_capacity=cfg.pad_to_capacity,
        moe_token_drop_policy=cfg.drop_policy,
        moe_router_dtype=cfg.router_dtype,
        moe_input_jitter_eps=cfg.input_jitter or None,
    )


def build_router(
    cfg: MoEConfig, weight: torch.Tensor, group: dist.ProcessGroup
) -> megatron_router.TopKRouter:
    """Megatron's TopKRouter for `cfg` with the given [E, D] gate weight, in training mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TransformerConfig(
            num_layers=1,
            hidden_size=weight.shape[1],
            num_attention_heads=1,
            add_bias_linear=False,
            params_dtype=torch.float32,
            **megatron_kwargs(cfg),
        )
    groups = ProcessGroupCollection(tp=group, cp=group, tp_cp=group, tp_dp_cp=group)
    router = megatron_router.TopKRouter(config=config, pg_collection=groups)
    with torch.no_grad():
        router.weight.copy_(weight)
    router.set_layer_number(1)
    router.train()
    moe_utils.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    moe_utils.clear_aux_losses_tracker()
    return router


def tracked_losses() -> dict[str, float]:
    """Megatron's logged loss values (each divided by its coefficient) for layer 1."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    return {name: float(entry["values"][0]) for name, entry in tracker.items()}


@dataclass
class Combined:
    """Megatron's permute -> per-expert linear map x @ W_e, times prob -> unpermute."""

    output_TD: torch.Tensor
    tokens_per_expert_E: torch.Tensor


def megatron_combine(
    hidden_TD: torch.Tensor,
    probs_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    expert_weights_EDD: torch.Tensor,
    capacity: int | None,
) -> Combined:
    """`capacity` set: Megatron's drop-and-pad path (every expert gets exactly `capacity`)."""
    E = routing_map_TE.shape[1]
    padded = capacity is not None
    rows, row_probs, sorted_indices = moe_utils.permute(
        hidden_TD,
        routing_map_TE,
        probs=probs_TE,
        num_out_tokens=capacity * E if padded else None,
        drop_and_pad=padded,
    )
    counts = (
        torch.full((E,), capacity, dtype=torch.long) if padded else routing_map_TE.sum(0).long()
    )
    outputs = []
    for e, chunk, p in zip(range(E), rows.split(counts.tolist()), row_probs.split(counts.tolist())):
        outputs.append((chunk @ expert_weights_EDD[e].to(chunk.dtype)) * p.unsqueeze(-1))
    out = moe_utils.unpermute(
        torch.cat(outputs), sorted_indices, hidden_TD.shape, drop_and_pad=padded
    )
    return Combined(out, counts)
