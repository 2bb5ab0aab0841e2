"""Context-parallel attention is exact against full causal attention, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from moefold.model.transformer import SequencePositions
from moefold.parallel.context_parallel import ContextParallelAttention
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks


def body(rank, world_size, seq_len, heads, kv_heads):
    groups = build_parallel_groups(ParallelLayout.build(world_size, cp=world_size))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, seq_len, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, seq_len, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, seq_len, 8, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, heads, seq_len, 8, generator=g, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(grad)

    positions = SequencePositions(world_size, rank).attention(seq_len)
    local = [t.detach()[:, :, positions].clone().requires_grad_() for t in (q, k, v)]
    attention = ContextParallelAttention(groups.group("cp"), groups.comm_stats)
    out = attention(*local, positions)
    out.backward(grad[:, :, positions])
    torch.testing.assert_close(out, ref[:, :, positions], rtol=1e-10, atol=1e-12)
    for mine, full in zip(local, (q, k, v)):
        torch.testing.assert_close(mine.grad, full.grad[:, :, positions], rtol=1e-10, atol=1e-12)


@pytest.mark.dist
@pytest.mark.parametrize(
    "cp,seq_len,heads,kv_heads",
    [(2, 12, 4, 2), (2, 16, 2, 2), (4, 24, 6, 2), (4, 32, 4, 1), (3, 18, 4, 4)],
    ids=["cp2-s12-gqa", "cp2-s16-mha", "cp4-s24-gqa", "cp4-s32-mqa", "cp3-s18"],
)
def test_cp_attention_exact(cp, seq_len, heads, kv_heads):
    run_ranks(body, cp, seq_len, heads, kv_heads)


def test_positions_split_is_load_balanced():
    chunks = [SequencePositions(2, r).attention(8).tolist() for r in range(2)]
    assert chunks == [[0, 1, 6, 7], [2, 3, 4, 5]]
    tp_slices = [SequencePositions(2, 0, 2, t).local(8).tolist() for t in range(2)]
    assert tp_slices == [[0, 1], [6, 7]]
