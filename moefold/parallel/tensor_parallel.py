"""apply_tp: Megatron-style tensor parallelism with sequence parallelism.

Between blocks every tp rank holds its own contiguous slice of the sequence (sequence
parallel), so norms, the embedding, the LM head, the router and the shared expert run
unsharded on distinct tokens (their gradients are summed over tp later). Attention and the
dense MLP shard their weights: q/k/v and gate/up by output (column parallel: heads, incl. GQA
kv heads, or FFN columns), o_proj and down_proj by input (row parallel). Their region
all-gathers the sequence on entry and reduce-scatters the partial sums on exit.
"""

from __future__ import annotations

import torch
from torch import nn

from moefold.model.mla import MLAttention
from moefold.model.transformer import Attention, DenseMLP
from moefold.parallel.comm import CommStats, all_gather_dim, reduce_scatter_dim
from moefold.parallel.data_parallel import mark_family
from moefold.parallel.mesh import ParallelGroups

SEQUENCE_DIM = 1  # hidden states are [B, S, D]


class SequenceParallelRegion:
    """Entry: all-gather the sequence (backward: reduce-scatter the gradient).
    Exit: reduce-scatter row-parallel partial sums back to sequence shards (backward: gather)."""

    def __init__(self, group, stats: CommStats | None) -> None:
        self.group, self.stats = group, stats

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_dim(x, SEQUENCE_DIM, self.group, family="tp", stats=self.stats)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_dim(x, SEQUENCE_DIM, self.group, family="tp", stats=self.stats)


def _rows(linear: nn.Linear, part: slice) -> None:
    """Column parallel: keep output features `part` (weight rows and bias)."""
    linear.weight = nn.Parameter(linear.weight.detach()[part].contiguous())
    mark_family(linear.weight, "tensor", (("tp", 0),))
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[part].contiguous())
        mark_family(linear.bias, "tensor", (("tp", 0),))


def _columns(linear: nn.Linear, part: slice) -> None:
    """Row parallel: keep input features `part`; the bias (if any) would stay replicated."""
    assert linear.bias is None, "row-parallel layers here carry no bias"
    linear.weight = nn.Parameter(linear.weight.detach()[:, part].contiguous())
    mark_family(linear.weight, "tensor", (("tp", 1),))


def _part(total: int, rank: int, size: int) -> slice:
    width = total // size
    return slice(rank * width, (rank + 1) * width)


def shard_attention(attn: Attention, rank: int, size: int) -> None:
    hd = attn.head_dim
    q_part = _part(attn.num_heads * hd, rank, size)
    kv_part = _part(attn.num_kv_heads * hd, rank, size)
    _rows(attn.q_proj, q_part)
    _rows(attn.k_proj, kv_part)
    _rows(attn.v_proj, kv_part)
    _columns(attn.o_proj, q_part)
    attn.num_heads //= size
    attn.num_kv_heads //= size


def shard_mla(attn: MLAttention, rank: int, size: int) -> None:
    """MLA as Megatron-Core splits it: the up projections (q_b_proj or q_proj, kv_b_proj) by
    heads, o_proj by heads; q_a_proj, kv_a_proj and the latent norms stay replicated (each tp
    rank's gradient of them is a partial sum over its heads, summed over tp like the norms')."""
    q_up = attn.q_proj if hasattr(attn, "q_proj") else attn.q_b_proj
    _rows(q_up, _part(attn.num_heads * attn.qk_dim, rank, size))
    _rows(attn.kv_b_proj, _part(attn.num_heads * (attn.nope_dim + attn.v_dim), rank, size))
    _columns(attn.o_proj, _part(attn.num_heads * attn.v_dim, rank, size))
    attn.num_heads //= size


def shard_dense_mlp(mlp: DenseMLP, rank: int, size: int) -> None:
    part = _part(mlp.gate_proj.out_features, rank, size)
    _rows(mlp.gate_proj, part)
    _rows(mlp.up_proj, part)
    _columns(mlp.down_proj, part)


@torch.no_grad()
def apply_tp(model: nn.Module, groups: ParallelGroups) -> None:
    size = groups.size("tp")
    if size == 1:
        return
    rank = groups.coord("tp")
    region = SequenceParallelRegion(groups.group("tp"), groups.comm_stats)
    for module in model.modules():
        if isinstance(module, Attention):
            shard_attention(module, rank, size)
            module.region = region
        elif isinstance(module, MLAttention):
            shard_mla(module, rank, size)
            module.region = region
        elif isinstance(module, DenseMLP):
            shard_dense_mlp(module, rank, size)
            module.region = region
