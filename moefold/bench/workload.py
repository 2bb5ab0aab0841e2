"""The workload of the MoE-layer benchmarks: the layer shape, its model FLOPs, and one set of
random router and expert weights that every implementation copies.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, F expert FFN hidden,
E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INIT_STD = 0.02


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The layer shape and the tokens of one step."""

    batch: int
    seq: int
    hidden: int
    ffn_hidden: int  # one routed expert; the dense MLP gets topk * ffn_hidden
    num_experts: int
    topk: int

    @property
    def num_tokens(self) -> int:
        return self.batch * self.seq

    def moe_step_flops(self) -> int:
        """Model FLOPs of forward + backward: router + K experts x 3 matmuls, times 3."""
        T, D = self.num_tokens, self.hidden
        router = 2 * T * D * self.num_experts
        experts = self.topk * 3 * 2 * T * D * self.ffn_hidden
        return 3 * (router + experts)

    def dense_step_flops(self) -> int:
        return 3 * 3 * 2 * self.num_tokens * self.hidden * self.topk * self.ffn_hidden


@dataclass(frozen=True)
class ExpertWeights:
    """One set of router and expert weights (fp32) that every MoE row copies."""

    router_ED: torch.Tensor
    gate_EDF: torch.Tensor
    up_EDF: torch.Tensor
    down_EFD: torch.Tensor


def random_weights(workload: Workload, seed: int) -> ExpertWeights:
    generator = torch.Generator().manual_seed(seed)
    E, D, F = workload.num_experts, workload.hidden, workload.ffn_hidden

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * INIT_STD

    return ExpertWeights(normal(E, D), normal(E, D, F), normal(E, D, F), normal(E, F, D))
