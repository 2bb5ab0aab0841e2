"""The de-duplicated all-to-all dispatcher on real gloo ranks: against the LocalDispatcher
reference and the plain all-to-all dispatcher, and its byte count against the routing.

Every rank owns distinct tokens. Rows reaching the experts are pure data movement, so they
equal the plain dispatcher's rows exactly; outputs and gradients differ from the reference only
in summation order (a token's expert outputs are summed on the destination first).
"""

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist

from moefold.config import MoEConfig
from moefold.dispatch.routing import expert_capacity, keep_mask
from moefold.model.moe import MoELayer
from moefold.parallel.expert_parallel import apply_ep, expert_shard
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from tests.dist.moe_cases import HIDDEN, make_layer, tokens

NUM_EXPERTS = 8
FFN = 12


def expert_grads(layer: MoELayer, groups) -> dict[str, torch.Tensor]:
    """Expert weight gradients summed over edp (the other token owners)."""
    out = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        grad = getattr(layer.experts, name).grad.clone()
        dist.all_reduce(grad, group=groups.group("edp"))
        out[name] = grad
    return out


def body(rank, world_size, cfg_kwargs, ep, etp, routing):
    cfg = MoEConfig(num_experts=NUM_EXPERTS, ffn_hidden=FFN, **cfg_kwargs)
    groups = build_parallel_groups(ParallelLayout.build(world_size, ep=ep, etp=etp))
    reference = make_layer(cfg, routing == "one-rank")
    plain = copy.deepcopy(reference)
    apply_ep(plain, groups)
    dedup = copy.deepcopy(reference)
    dedup.cfg = dataclasses.replace(cfg, dedup=True)
    apply_ep(dedup, groups)
    assert type(dedup.dispatcher).__name__ == "DedupAllToAllDispatcher"

    grad = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(7 + rank))
    runs = {}
    for name, layer in (("reference", reference), ("plain", plain), ("dedup", dedup)):
        x = tokens(rank, routing == "one-rank")
        out = layer(x)
        out.backward(grad)
        runs[name] = (out.detach(), x.grad)
    for name in ("plain", "dedup"):
        torch.testing.assert_close(runs[name][0], runs["reference"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runs[name][1], runs["reference"][1], rtol=1e-4, atol=1e-6)

    experts_slice, ffn_slice = expert_shard(NUM_EXPERTS, FFN, groups)
    plain_grads, dedup_grads = expert_grads(plain, groups), expert_grads(dedup, groups)
    for name, got in dedup_grads.items():
        full = getattr(reference.experts, name).grad.clone()
        dist.all_reduce(full)  # every rank's tokens contribute to the experts' gradient
        cut = full[experts_slice]
        want = cut[:, :, ffn_slice] if name != "down_proj" else cut[:, ffn_slice]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(got, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert float(dedup.stats.dropped) == float(plain.stats.dropped)
    same_expert_rows(plain, dedup, rank, routing)
    return float(dedup.stats.dropped)


@torch.no_grad()
def same_expert_rows(plain: MoELayer, dedup: MoELayer, rank: int, routing: str) -> None:
    """Both dispatchers hand the local experts the same rows, in the same order, bit for bit."""
    x_TD = tokens(rank, routing == "one-rank").detach().view(-1, HIDDEN)
    probs_TK, ids_TK = plain.router(x_TD, num_sequences=2)
    want = plain.dispatcher.dispatch(x_TD, probs_TK, ids_TK)
    got = dedup.dispatcher.dispatch(x_TD, probs_TK, ids_TK)
    for index in range(3):  # rows, probabilities, tokens per local expert
        assert torch.equal(got[index], want[index])


CASES = {
    "dropless-top2": {"topk": 2},
    "dropless-top4": {"topk": 4},
    "capacity-probs": {"topk": 2, "capacity_factor": 1.0},
    "capacity-position-top4": {"topk": 4, "capacity_factor": 0.5, "drop_policy": "position"},
    "capacity-padded-top4": {"topk": 4, "capacity_factor": 1.0, "pad_to_capacity": True},
}
LAYOUTS = {
    "ep2": (2, 2, 1),
    "ep4": (4, 4, 1),
    "etp2": (2, 1, 2),
    "ep2-etp2": (4, 2, 2),
    "ep4-etp2": (8, 4, 2),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["ep2", "ep2-etp2"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_dedup_matches_local_and_plain_all_to_all(case, layout):
    world, ep, etp = LAYOUTS[layout]
    run_ranks(body, world, CASES[case], ep, etp, "random", timeout=300)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["dropless-top4", "capacity-padded-top4"])
@pytest.mark.parametrize("layout", ["etp2", "ep4", "ep4-etp2"])
def test_dedup_matches_on_more_layouts(case, layout):
    world, ep, etp = LAYOUTS[layout]
    run_ranks(body, world, CASES[case], ep, etp, "random", timeout=300)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["dropless-top2", "capacity-padded-top4"])
def test_dedup_all_tokens_to_one_rank_and_idle_ranks(case):
    # Experts 0 and 1 live on ep rank 0: ranks 1-3 receive no rows at all.
    dropped = run_ranks(body, 4, CASES[case], 4, 1, "one-rank", timeout=300)
    if case == "capacity-padded-top4":
        assert all(d > 0 for d in dropped)


# ---- bytes: the counter against the routing ----------------------------------------------


def kept_ids(
    ids_TK: torch.Tensor, probs_TK: torch.Tensor, cfg: MoEConfig, num_sequences: int
) -> torch.Tensor:
    """Expert ids with dropped choices set to -1 (the source rank's capacity rule)."""
    if cfg.capacity_factor is None:
        return ids_TK
    T, K = ids_TK.shape
    capacity = expert_capacity(T, cfg.num_experts, K, cfg.capacity_factor)
    keep = keep_mask(ids_TK, probs_TK, cfg.num_experts, capacity, cfg.drop_policy, num_sequences)
    return torch.where(keep, ids_TK, -1)


def expected_ep_bytes(ids_by_rank: list[torch.Tensor], me: int, cfg: MoEConfig) -> dict:
    """Bytes rank `me` of the ep group sends, from every rank's kept expert ids [T, K].

    Unique rows (distinct destination ranks per token) travel four times per step (dispatch
    and combine, forward and backward); per slot row a probability and its unique-row index
    as two fp32 (forward, and their gradient back); per peer a count table of e + 1 int64.
    Padding slot rows carry a probability and an index but no hidden row.
    """
    n = len(ids_by_rank)
    e = cfg.num_experts // n
    unique_sent = unique_received = slots_sent = slots_received = 0
    for source, ids in enumerate(ids_by_rank):
        for row in ids.tolist():
            ranks = [i // e for i in row if i >= 0]
            for dest in set(ranks):
                if source == me and dest != me:
                    unique_sent += 1
                if dest == me and source != me:
                    unique_received += 1
            for dest in ranks:
                slots_sent += source == me and dest != me
                slots_received += dest == me and source != me
    if cfg.pad_to_capacity:  # every expert gets C slot rows from every source, padding too
        T, K = ids_by_rank[me].shape
        slots_sent = slots_received = (
            (n - 1) * e * expert_capacity(T, n * e, K, cfg.capacity_factor)
        )
    return {
        "rows": 2 * (unique_sent + unique_received) * HIDDEN * 4,
        "metadata": (slots_sent + slots_received) * 8 + (n - 1) * (e + 1) * 8,
        "unique_sent": unique_sent,
    }


def bytes_body(rank, world_size, cfg_kwargs):
    cfg = MoEConfig(num_experts=NUM_EXPERTS, ffn_hidden=FFN, dedup=True, **cfg_kwargs)
    groups = build_parallel_groups(ParallelLayout.build(world_size, ep=world_size))
    layer = make_layer(cfg, False)
    apply_ep(layer, groups)
    x = tokens(rank, False)
    probs_TK, ids_TK = layer.router(x.detach().view(-1, HIDDEN), num_sequences=2)
    ids_by_rank = [torch.empty_like(ids_TK) for _ in range(world_size)]
    dist.all_gather(ids_by_rank, kept_ids(ids_TK, probs_TK, cfg, num_sequences=x.shape[0]))

    groups.comm_stats.reset()
    layer(x).sum().backward()
    measured = groups.comm_stats.as_dict()
    want = expected_ep_bytes(ids_by_rank, rank, cfg)
    assert measured["ep"] == want["rows"] + want["metadata"], (measured, want)
    assert sum(v for k, v in measured.items() if k != "ep") == 0
    return measured["ep"] - want["metadata"], want["unique_sent"], x.shape[0] * x.shape[1]


@pytest.mark.dist
@pytest.mark.parametrize(
    "case", ["dropless-top2", "dropless-top4", "capacity-position-top4", "capacity-padded-top4"]
)
def test_dedup_bytes_equal_the_routing_figure(case):
    world = 4
    results = run_ranks(bytes_body, world, CASES[case], timeout=300)
    # Over the group, measured row bytes per token = 4 trips (dispatch and combine, forward
    # and backward) x D x 4 bytes x the mean number of distinct remote ranks per token.
    row_bytes = sum(r[0] for r in results)
    distinct_remote = sum(r[1] for r in results)
    num_tokens = sum(r[2] for r in results)
    assert row_bytes / num_tokens == 4 * HIDDEN * 4 * distinct_remote / num_tokens
