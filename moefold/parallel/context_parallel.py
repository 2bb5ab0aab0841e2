"""apply_cp: exact causal attention over a sequence split across the cp group.

Each rank holds two chunks of its sequences (load-balanced causal split, see
model.transformer.SequencePositions). Attention all-gathers K and V over cp (their backward
reduce-scatters the gradients) and masks by global positions, so the result is exact.

Why all-gather rather than a ring exchange: on the gloo/CPU path the K/V all-gather is one
collective per layer instead of cp-1 point-to-point rounds, GQA keeps K/V small (kv_heads <
heads), and the masked softmax needs no online rescaling, so forward and backward stay
bit-comparable to full attention. A ring (K/V blocks passed around with an online softmax)
would save memory at very long contexts; it can be added behind the same attention_fn.

Shape legend: B batch, H local query heads, G local kv heads, S local sequence, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from moefold.kernels import gemm
from moefold.model.mla import MLAttention
from moefold.model.transformer import Attention, SequencePositions
from moefold.parallel.comm import CommStats, all_gather_dim
from moefold.parallel.mesh import ParallelGroups

SEQUENCE_DIM = 2  # attention tensors are [B, heads, S, Dh]


class ContextParallelAttention:
    """Attention callable: local queries against the cp group's gathered keys and values."""

    def __init__(self, group, stats: CommStats | None) -> None:
        self.group, self.stats = group, stats

    def __call__(self, q_BHSDh, k_BGSDh, v_BGSDh, positions_S, bf16_gemm="auto") -> torch.Tensor:
        k_all = all_gather_dim(k_BGSDh, SEQUENCE_DIM, self.group, family="cp", stats=self.stats)
        v_all = all_gather_dim(v_BGSDh, SEQUENCE_DIM, self.group, family="cp", stats=self.stats)
        key_positions = self._gather_positions(positions_S)
        mask_SS = key_positions[None, :] <= positions_S[:, None]
        return gemm.scaled_dot_product_attention(
            q_BHSDh, k_all, v_all, bf16_gemm, attn_mask=mask_SS, enable_gqa=True
        )

    def _gather_positions(self, positions_S: torch.Tensor) -> torch.Tensor:
        # Positions are known to every rank: the same chunk rule, no communication needed.
        size = self.group.size()
        seq_len = positions_S.numel() * size
        return torch.cat(
            [SequencePositions(size, r).attention(seq_len, positions_S.device) for r in range(size)]
        )


def apply_cp(model: nn.Module, groups: ParallelGroups) -> None:
    if groups.size("cp") == 1:
        return
    attention_fn = ContextParallelAttention(groups.group("cp"), groups.comm_stats)
    for module in model.modules():
        if isinstance(module, (Attention, MLAttention)):
            module.attention_fn = attention_fn
