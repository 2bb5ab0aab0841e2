"""AllGatherDispatcher: gather every token of the ep x etp group, compute the local experts,
reduce-scatter the partial outputs back.

Shape legend: T local tokens, D model dim, K experts per token, e local experts, R rows,
g ep x etp group size.

Capacity and dropping are decided on each source rank over its own tokens (the same rule as
the all-to-all dispatcher), then the kept choices travel with the tokens. Expert tensor
parallel ranks compute F-shard partials of the same experts; the reduce-scatter over the
whole ep x etp group sums them together with the other ranks' experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from moefold.config import MoEConfig
from moefold.dispatch.local import gather_rows
from moefold.dispatch.routing import expert_capacity, keep_mask, route_slots
from moefold.parallel.comm import CommStats, all_gather_dim, all_gather_sizes, reduce_scatter_dim


@dataclass(frozen=True)
class AllGatherPlan:
    token_index_R: torch.Tensor  # gathered-token index of each row (total = padding)
    num_gathered: int
    token_sizes: list[int]  # tokens held by each rank of the group
    num_dropped: torch.Tensor


class AllGatherDispatcher:
    """Dispatch by all-gather over `group` (ep x etp, etp innermost); this rank holds experts
    [ep_rank * e, (ep_rank + 1) * e)."""

    def __init__(
        self,
        cfg: MoEConfig,
        group: ProcessGroup,
        ep_rank: int,
        ep_size: int,
        stats: CommStats | None = None,
    ) -> None:
        self.cfg = cfg
        self.group = group
        self.num_local_experts = cfg.num_experts // ep_size
        self.first_expert = ep_rank * self.num_local_experts
        self.stats = stats

    def _kept_ids(
        self, probs_TK, expert_ids_TK, num_sequences: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids with dropped choices set to -1, and the number dropped on this rank."""
        cfg = self.cfg
        if cfg.capacity_factor is None:
            return expert_ids_TK, torch.zeros((), dtype=torch.long, device=expert_ids_TK.device)
        T, K = expert_ids_TK.shape
        capacity = expert_capacity(T, cfg.num_experts, K, cfg.capacity_factor)
        keep = keep_mask(
            expert_ids_TK, probs_TK, cfg.num_experts, capacity, cfg.drop_policy, num_sequences
        )
        return torch.where(keep, expert_ids_TK, -1), (~keep).sum()

    def dispatch(self, hidden_TD, probs_TK, expert_ids_TK, num_sequences: int = 1):
        cfg, e = self.cfg, self.num_local_experts
        kept_ids_TK, num_dropped = self._kept_ids(probs_TK, expert_ids_TK, num_sequences)
        sizes = all_gather_sizes(hidden_TD.shape[0], self.group, family="ep", stats=self.stats)
        hidden = all_gather_dim(
            hidden_TD, 0, self.group, sizes=sizes, family="ep", stats=self.stats
        )
        probs = all_gather_dim(probs_TK, 0, self.group, sizes=sizes, family="ep", stats=self.stats)
        kept_ids = all_gather_dim(
            kept_ids_TK, 0, self.group, sizes=sizes, family="ep", stats=self.stats
        )
        local_ids = kept_ids - self.first_expert
        is_local = (local_ids >= 0) & (local_ids < e)
        # Non-local and dropped choices go to a sentinel expert e that is never computed.
        local_ids = torch.where(is_local, local_ids, e)
        routing = route_slots(local_ids, probs, e + 1, None)
        tokens_per_expert = routing.tokens_per_expert_E[:e]
        slots = routing.slots_R[: int(tokens_per_expert.sum())]
        if cfg.pad_to_capacity and cfg.capacity_factor is not None:
            slots, tokens_per_expert = self._pad(slots, tokens_per_expert, sizes)
        padded = cfg.pad_to_capacity and cfg.capacity_factor is not None
        rows_RD, probs_R, token_index_R = gather_rows(hidden, probs, slots, padded)
        plan = AllGatherPlan(token_index_R, hidden.shape[0], sizes, num_dropped)
        return rows_RD, probs_R, tokens_per_expert, plan

    def _pad(self, slots, tokens_per_expert, sizes):
        """Pad every local expert to (group size x per-source capacity) rows, like all-to-all."""
        cfg, e = self.cfg, self.num_local_experts
        K = cfg.topk
        capacity = sum(expert_capacity(t, cfg.num_experts, K, cfg.capacity_factor) for t in sizes)
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        ids = torch.repeat_interleave(torch.arange(e, device=slots.device), tokens_per_expert)
        rows = ids * capacity + torch.arange(slots.numel(), device=slots.device) - starts[ids]
        padded = torch.full((e * capacity,), -1, dtype=torch.long, device=slots.device)
        padded[rows] = slots
        return padded, torch.full_like(tokens_per_expert, capacity)

    def combine(self, expert_output_RD: torch.Tensor, plan: AllGatherPlan) -> torch.Tensor:
        out = expert_output_RD.new_zeros(plan.num_gathered + 1, expert_output_RD.shape[1])
        out = out.index_add(0, plan.token_index_R, expert_output_RD)[: plan.num_gathered]
        return reduce_scatter_dim(
            out, 0, self.group, sizes=plan.token_sizes, family="ep", stats=self.stats
        )
