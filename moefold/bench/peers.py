"""Other libraries' MoE layers on the moe-layer benchmark's weights: Hugging Face Mixtral and
Qwen3-MoE sparse blocks, torchtitan's MoE and DeepSpeed's MoE (the last two only when their
packages are installed: `pip install -e ".[bench]"`).

Every builder copies the same router and expert weights (`moe_layer.ExpertWeights`, fp32,
moefold's [E, D, F] layout) into the library's own layout, so all routers send the same tokens
to the same experts. Shape legend: E experts, D model dim, F expert FFN hidden, K top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from moefold.bench.workload import ExpertWeights, Workload


@torch.no_grad()
def _load_hf_experts(block: nn.Module, weights: ExpertWeights) -> nn.Module:
    # transformers stores [gate; up] as (E, 2F, D) and down as (E, D, F), i.e. nn.Linear layout.
    block.gate.weight.copy_(weights.router_ED)
    gate_up = torch.cat([weights.gate_EDF.transpose(1, 2), weights.up_EDF.transpose(1, 2)], 1)
    block.experts.gate_up_proj.copy_(gate_up)
    block.experts.down_proj.copy_(weights.down_EFD.transpose(1, 2))
    return block


def _build_hf_block(config, block_class, weights: ExpertWeights, experts_impl: str) -> nn.Module:
    config._experts_implementation = experts_impl
    return _load_hf_experts(block_class(config), weights)


def build_hf_mixtral(workload: Workload, weights: ExpertWeights, experts_impl: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=workload.hidden,
        intermediate_size=workload.ffn_hidden,
        num_local_experts=workload.num_experts,
        num_experts_per_tok=workload.topk,
        router_jitter_noise=0.0,
    )
    return _build_hf_block(config, MixtralSparseMoeBlock, weights, experts_impl)


def build_hf_qwen3_moe(workload: Workload, weights: ExpertWeights, experts_impl: str) -> nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=workload.hidden,
        moe_intermediate_size=workload.ffn_hidden,
        num_experts=workload.num_experts,
        num_experts_per_tok=workload.topk,
        norm_topk_prob=True,
    )
    return _build_hf_block(config, Qwen3MoeSparseMoeBlock, weights, experts_impl)


@torch.no_grad()
def build_torchtitan(workload: Workload, weights: ExpertWeights) -> nn.Module:
    """torchtitan's MoE (0.3 Config API); its experts always compute in bf16 grouped_mm."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    E, D, F, K = workload.num_experts, workload.hidden, workload.ffn_hidden, workload.topk
    config = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=D, out_features=E),
            top_k=K,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
    )
    moe = config.build()
    moe.router.gate.weight.copy_(weights.router_ED)
    experts = moe.routed_experts.inner_experts
    experts.w1_EFD.copy_(weights.gate_EDF.transpose(1, 2))
    experts.w3_EFD.copy_(weights.up_EDF.transpose(1, 2))
    experts.w2_EDF.copy_(weights.down_EFD.transpose(1, 2))
    return moe


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.up_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.down_proj = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def build_deepspeed(workload: Workload, weights: ExpertWeights, ep: int = 1) -> nn.Module:
    """DeepSpeed's MoE, dropless (drop_tokens=False), expert parallel over the default group's
    `ep` ranks (a world-size-1 gloo group is made when none exists). Rank r holds experts
    [r * E/ep, (r + 1) * E/ep), as moefold's apply_ep does."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    moe = MoE(
        workload.hidden,
        _SwiGLU(workload.hidden, workload.ffn_hidden),
        num_experts=workload.num_experts,
        ep_size=ep,
        k=workload.topk,
        drop_tokens=False,
        top2_2nd_expert_sampling=False,
    )
    moe.set_deepspeed_parallelism()
    moe.deepspeed_moe.gate.wg.weight.copy_(weights.router_ED)
    first = dist.get_rank() % ep * (workload.num_experts // ep)
    for index, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        expert.gate_proj.weight.copy_(weights.gate_EDF[first + index].T)
        expert.up_proj.weight.copy_(weights.up_EDF[first + index].T)
        expert.down_proj.weight.copy_(weights.down_EFD[first + index].T)
    return moe
