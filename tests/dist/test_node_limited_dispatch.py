"""Node-limited routing on the de-duplicated all-to-all: each token reaches at most the ranks
of its M groups, and the bytes the dispatcher sends equal the figure counted from the routing.

`measure` is also the source of the bytes-per-token figures in docs/deepseek.md:
    python -c "from tests.dist.test_node_limited_dispatch import report; report()"
"""

import pytest
import torch
import torch.distributed as dist

from moefold.config import MoEConfig
from moefold.dispatch.routing import max_destination_ranks
from moefold.model.moe import MoELayer
from moefold.parallel.expert_parallel import apply_ep
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from tests.dist.moe_cases import HIDDEN
from tests.dist.test_dedup_dispatcher import expected_ep_bytes

FP32 = 4


def deepseek_moe(num_experts: int, topk: int, groups: int, group_topk: int) -> MoEConfig:
    """DeepSeek-V3's router (sigmoid, expert bias, seq_aux, renormalised, scaled), dedup on."""
    return MoEConfig(
        num_experts=num_experts,
        topk=topk,
        ffn_hidden=8,
        score="sigmoid",
        expert_bias=True,
        norm_topk_prob=True,
        scaling_factor=2.5,
        num_groups=groups,
        group_topk=group_topk,
        group_score_topk=2 if groups else 0,
        aux_loss="seq_aux",
        aux_loss_coeff=1e-4,
        dedup=True,
    )


def body(rank, world_size, cfg: MoEConfig, hidden: int, seq: int):
    groups = build_parallel_groups(ParallelLayout.build(world_size, ep=world_size))
    torch.manual_seed(0)
    layer = MoELayer(hidden, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # an uneven bias, as training leaves it
        layer.router.expert_bias.copy_(0.05 * torch.randn(cfg.num_experts))
    apply_ep(layer, groups)
    x = torch.randn(2, seq, hidden, generator=torch.Generator().manual_seed(100 + rank))
    x.requires_grad_()
    _, ids_TK = layer.router(x.detach().view(-1, hidden), num_sequences=2)
    per_rank = cfg.num_experts // world_size
    hits_Tn = torch.zeros(ids_TK.shape[0], world_size, dtype=torch.bool)
    hits_Tn.scatter_(1, ids_TK // per_rank, True)
    bound = max_destination_ranks(
        cfg.num_experts, cfg.topk, cfg.num_groups, cfg.group_topk, world_size
    )
    assert int(hits_Tn.sum(1).max()) <= bound
    ids_by_rank = [torch.empty_like(ids_TK) for _ in range(world_size)]
    dist.all_gather(ids_by_rank, ids_TK)

    groups.comm_stats.reset()
    layer(x).sum().backward()
    measured = groups.comm_stats.as_dict()["ep"]
    want = expected_ep_bytes(ids_by_rank, rank, cfg)  # rows counted at D = HIDDEN
    want_rows = want["rows"] * hidden // HIDDEN
    assert measured == want_rows + want["metadata"], (measured, want)
    hits_Tn[:, rank] = False
    return {
        "row_bytes": measured - want["metadata"],
        "metadata_bytes": want["metadata"],
        "distinct_remote": int(hits_Tn.sum()),
        "tokens": ids_TK.shape[0],
    }


def measure(ep: int, cfg: MoEConfig, hidden: int = 16, seq: int = 6) -> dict:
    """Bytes the dedup dispatcher sends per token (all ranks, forward + backward) and the
    analytical figure 4 * D * 4 bytes * distinct remote ranks per token, from the routing."""
    results = run_ranks(body, ep, cfg, hidden, seq, timeout=600)
    tokens = sum(r["tokens"] for r in results)
    distinct = sum(r["distinct_remote"] for r in results) / tokens
    return {
        "row_bytes_per_token": sum(r["row_bytes"] for r in results) / tokens,
        "metadata_bytes_per_token": sum(r["metadata_bytes"] for r in results) / tokens,
        "distinct_remote_per_token": distinct,
        "analytical_row_bytes": 4 * hidden * FP32 * distinct,
    }


@pytest.mark.dist
def test_node_limited_tokens_reach_at_most_m_ranks_and_bytes_match():
    # 8 experts on 4 ranks, one group per rank, M = 2 of 4 groups, K = 4.
    limited = measure(4, deepseek_moe(8, 4, groups=4, group_topk=2))
    free = measure(4, deepseek_moe(8, 4, groups=0, group_topk=0))
    for figures in (limited, free):
        assert figures["row_bytes_per_token"] == figures["analytical_row_bytes"]
    assert limited["distinct_remote_per_token"] < 2  # at most 2 ranks, one may be local
    assert limited["row_bytes_per_token"] < free["row_bytes_per_token"]


def report() -> None:
    """The figures of docs/deepseek.md: DeepSeek-V3's routing ratios scaled down
    (64 experts in 8 groups, K = 8, M = 4) on ep = 8, with and without the group limit."""
    for name, groups, group_topk in (("node-limited M=4", 8, 4), ("unlimited", 0, 0)):
        figures = measure(8, deepseek_moe(64, 8, groups, group_topk), hidden=64, seq=64)
        print(name, {k: round(v, 2) for k, v in figures.items()})
