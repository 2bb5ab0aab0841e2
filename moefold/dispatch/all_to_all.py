"""AllToAllDispatcher: count exchange, then token exchange over the ep group (+ etp gather).

Shape legend: T local tokens, D model dim, K experts per token, E experts in total,
e local experts, R rows for the local experts, n ep size, m etp size.

dispatch: route locally (capacity per source rank) -> rows grouped by global expert, hence by
destination ep rank -> exchange per-expert counts -> all-to-all rows and probabilities over ep
-> all-gather over etp (every etp rank computes its F-shard for all of them) -> sort rows from
(source, local expert) order to (local expert, source) order. combine runs the exact reverse:
unsort -> reduce-scatter over etp (sums the F-shard partial outputs) -> all-to-all back ->
sum rows into tokens. The probability is applied by the experts, so rows travel unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from moefold.config import MoEConfig
from moefold.dispatch.local import gather_rows, route_or_override, scatter_rows, take_rows
from moefold.parallel.comm import (
    CommStats,
    all_gather_dim,
    all_to_all,
    exchange_counts,
    reduce_scatter_dim,
)


@dataclass(frozen=True)
class AllToAllPlan:
    token_index_R: torch.Tensor  # token of each locally permuted row (T = padding)
    num_tokens: int
    num_dropped: torch.Tensor
    input_splits: list[int]  # rows sent to each ep rank
    output_splits: list[int]  # rows received from each ep rank
    etp_sizes: list[int]  # rows held by each etp rank after the all-to-all
    sort_index: torch.Tensor  # (source, expert) order -> (expert, source) order


def source_to_expert_order(counts_SE: torch.Tensor, total: int) -> torch.Tensor:
    """Index that reorders rows laid out source-major ([S, e] blocks) into expert-major order.

    `total` is the number of rows (counts_SE.sum()) as a host int, known from the split sizes.
    """
    S, e = counts_SE.shape
    flat = counts_SE.flatten()
    block_starts = torch.cumsum(flat, 0) - flat
    expert_major = torch.arange(S * e, device=flat.device).view(S, e).t().flatten()
    lengths, starts = flat[expert_major], block_starts[expert_major]
    output_starts = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - output_starts, lengths, output_size=total)
    return torch.arange(total, device=flat.device) + shift


def gather_counts_over_etp(
    counts_nc: torch.Tensor, etp_group: ProcessGroup, stats: CommStats | None
) -> torch.Tensor:
    """[m * n, c]: the [n, c] count tables of every etp rank, stacked in etp rank order."""
    if etp_group.size() == 1:
        return counts_nc
    gathered = all_gather_dim(counts_nc.flatten(), 0, etp_group, family="etp", stats=stats)
    return gathered.view(-1, counts_nc.shape[1])


class AllToAllDispatcher:
    """Expert parallelism over `ep_group`, expert tensor parallelism over `etp_group`."""

    def __init__(
        self,
        cfg: MoEConfig,
        ep_group: ProcessGroup,
        etp_group: ProcessGroup,
        stats: CommStats | None = None,
    ) -> None:
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep_size, self.etp_size = ep_group.size(), etp_group.size()
        self.num_local_experts = cfg.num_experts // self.ep_size
        self.stats = stats
        # The dry run's RoutingOverride (moefold/dryrun/routing.py): counts and split sizes
        # from a routing rule, for tensors that carry no values.
        self.routing_override = None

    def dispatch(self, hidden_TD, probs_TK, expert_ids_TK, num_sequences: int = 1):
        cfg, n, e = self.cfg, self.ep_size, self.num_local_experts
        override = self.routing_override
        routing = route_or_override(
            override, expert_ids_TK, probs_TK, self.num_experts, cfg, num_sequences
        )
        padded = cfg.pad_to_capacity and cfg.capacity_factor is not None
        rows_RD, probs_R, token_index_R = gather_rows(hidden_TD, probs_TK, routing.slots_R, padded)
        sent_E = routing.tokens_per_expert_E
        received_E = exchange_counts(sent_E, self.ep_group, family="ep", stats=self.stats)
        received_SE = gather_counts_over_etp(received_E.view(n, e), self.etp_group, self.stats)
        if override is not None:  # the exchanges above still run (their traffic counts)
            ep_rank = self.ep_group.rank()
            sent, received, etp_sizes, received_SE, tokens_per_expert_e = override.splits(
                sent_E, n, e, self.etp_size, ep_rank
            )
        else:
            # The one device-to-host sync of dispatch: collective split sizes are Python ints.
            sent = sent_E.view(n, e).sum(1).tolist()
            received = received_E.view(n, e).sum(1).tolist()
            etp_sizes = received_SE.view(self.etp_size, -1).sum(1).tolist()
            tokens_per_expert_e = received_SE.sum(0)
        rows_RD = all_to_all(rows_RD, received, sent, self.ep_group, family="ep", stats=self.stats)
        probs_R = all_to_all(probs_R, received, sent, self.ep_group, family="ep", stats=self.stats)
        rows_RD = all_gather_dim(
            rows_RD, 0, self.etp_group, sizes=etp_sizes, family="etp", stats=self.stats
        )
        probs_R = all_gather_dim(
            probs_R, 0, self.etp_group, sizes=etp_sizes, family="etp", stats=self.stats
        )
        sort_index = source_to_expert_order(received_SE, sum(etp_sizes))
        plan = AllToAllPlan(
            token_index_R,
            hidden_TD.shape[0],
            routing.num_dropped,
            sent,
            received,
            etp_sizes,
            sort_index,
        )
        rows_RD, probs_R = take_rows(rows_RD, sort_index), take_rows(probs_R, sort_index)
        return rows_RD, probs_R, tokens_per_expert_e, plan

    def combine(self, expert_output_RD: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        inverse = torch.empty_like(plan.sort_index)
        inverse[plan.sort_index] = torch.arange(plan.sort_index.numel(), device=inverse.device)
        rows_RD = take_rows(expert_output_RD, inverse)
        rows_RD = reduce_scatter_dim(
            rows_RD, 0, self.etp_group, sizes=plan.etp_sizes, family="etp", stats=self.stats
        )
        rows_RD = all_to_all(
            rows_RD,
            plan.input_splits,
            plan.output_splits,
            self.ep_group,
            family="ep",
            stats=self.stats,
        )
        return scatter_rows(rows_RD, plan.token_index_R, plan.num_tokens)
