"""Pure index math for token routing: sort token-slots by expert, capacity, dropping, padding,
and the de-duplicated sends (one row per token and destination rank).

No communication happens here. Shape legend: T tokens, K experts per token, E experts,
R rows handed to the experts, C capacity (rows per expert), n ranks, U unique rows.

A "slot" is one (token, choice) pair, numbered t * K + k. Rows are slots grouped by expert in
ascending expert order; inside an expert, rows keep token order. Capacity is counted per expert
on the tokens this rank routes (Megatron's rule): C = ceil(T * K / E * capacity_factor).

Tokens arrive batch-major (t = b * S + s for B sequences of S positions). The "position" drop
policy ranks them sequence-major, position first (Megatron's [S, B] token order): an over-full
expert drops the last positions of every sequence, not the last sequences. Under context or
sequence parallelism a rank holds each sequence's positions in increasing global order, so the
local ranking is the global position order restricted to this rank's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotRouting:
    """Which slot feeds each row, and how many rows each expert gets."""

    slots_R: torch.Tensor  # slot index per row; -1 marks a padding row
    tokens_per_expert_E: torch.Tensor  # rows per expert (C for every expert when padded)
    num_dropped: torch.Tensor  # token-slots dropped by capacity (scalar tensor)


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Rows each expert may take: ceil(T * K / E * capacity_factor)."""
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def position_order(
    num_tokens: int, topk: int, num_sequences: int, device: torch.device | None = None
) -> torch.Tensor:
    """Slot indices [T * K] sequence-major: position 0 of every sequence, then position 1, ...

    Slot t * K + k of token t = b * S + s ranks at (s, b, k).
    """
    _check_sequences(num_tokens, num_sequences)
    slots = torch.arange(num_tokens * topk, device=device)
    return slots.view(num_sequences, -1, topk).transpose(0, 1).flatten()


def _check_sequences(num_tokens: int, num_sequences: int) -> None:
    if num_sequences < 1 or num_tokens % num_sequences:
        raise ValueError(
            f"num_sequences={num_sequences} must be >= 1 and divide the {num_tokens} tokens"
        )


def keep_mask(
    expert_ids_TK: torch.Tensor,
    probs_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str,
    num_sequences: int = 1,
) -> torch.Tensor:
    """Bool [T, K]: the slots an expert keeps when at most `capacity` rows fit.

    drop_policy "probs" keeps each expert's highest-probability slots (ties: earlier token);
    "position" keeps its earliest positions, sequences interleaved (`position_order`).
    """
    flat_ids = expert_ids_TK.flatten()
    if drop_policy == "probs":
        priority = torch.argsort(-probs_TK.detach().flatten(), stable=True)
    else:
        num_tokens, topk = expert_ids_TK.shape
        priority = position_order(num_tokens, topk, num_sequences, flat_ids.device)
    order = priority[torch.argsort(flat_ids[priority], stable=True)]
    counts = torch.bincount(flat_ids, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = (
        torch.arange(flat_ids.numel(), device=flat_ids.device) - starts[flat_ids[order]]
    )
    keep = torch.zeros_like(flat_ids, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(expert_ids_TK)


def route_slots(
    expert_ids_TK: torch.Tensor,
    probs_TK: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
    num_sequences: int = 1,
) -> SlotRouting:
    """Group slots by expert, applying capacity, dropping and padding from the MoE config.

    `num_sequences`: how many sequences the T tokens hold (batch-major), for the position
    drop policy."""
    T, K = expert_ids_TK.shape
    flat_ids = expert_ids_TK.flatten()
    if capacity_factor is None:
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=num_experts)
        return SlotRouting(order, counts, torch.zeros((), dtype=torch.long, device=flat_ids.device))
    capacity = expert_capacity(T, num_experts, K, capacity_factor)
    keep = keep_mask(
        expert_ids_TK, probs_TK, num_experts, capacity, drop_policy, num_sequences
    ).flatten()
    num_kept = int(keep.sum())  # host sync: the row count sizes the expert input
    masked_ids = torch.where(keep, flat_ids, num_experts)
    kept_order = torch.argsort(masked_ids, stable=True)[:num_kept]
    counts = torch.bincount(flat_ids[keep], minlength=num_experts)
    num_dropped = (~keep).sum()
    if not pad_to_capacity:
        return SlotRouting(kept_order, counts, num_dropped)
    starts = torch.cumsum(counts, 0) - counts
    kept_ids = flat_ids[kept_order]
    rows = kept_ids * capacity + torch.arange(num_kept, device=flat_ids.device) - starts[kept_ids]
    slots = torch.full((num_experts * capacity,), -1, dtype=torch.long, device=flat_ids.device)
    slots[rows] = kept_order
    padded_counts = torch.full_like(counts, capacity)
    return SlotRouting(slots, padded_counts, num_dropped)


@dataclass(frozen=True)
class DestinationRows:
    """De-duplicated sends: one row per (token, destination rank) instead of one per slot.

    Unique rows are ordered by destination rank, then token (U unique rows, n ranks).
    """

    needed_nT: torch.Tensor  # bool: rank j needs token t (at least one kept slot there)
    unique_index_R: torch.Tensor  # per slot row: its unique row within its rank's block, or -1
    unique_per_rank_n: torch.Tensor  # unique rows per destination rank (sums to U)

    def token_index(self, num_unique: int) -> torch.Tensor:
        """[U] source token of each unique row; `num_unique` = U as a host int (no sync)."""
        flat = torch.nonzero_static(self.needed_nT.flatten(), size=num_unique).squeeze(1)
        return flat % self.needed_nT.shape[1]


def destination_rows(
    slots_R: torch.Tensor, expert_ids_TK: torch.Tensor, experts_per_rank: int, num_ranks: int
) -> DestinationRows:
    """Which tokens each rank needs once, and which of them each slot row refers to.

    Rank j owns experts [j * experts_per_rank, (j + 1) * experts_per_rank). A padding row
    (slot -1) refers to no token: its unique index is -1.
    """
    T, K = expert_ids_TK.shape
    valid = slots_R >= 0
    slot = slots_R.clamp(min=0)
    token_R = slot // K
    rank_R = expert_ids_TK.flatten()[slot] // experts_per_rank
    needed_nT = torch.zeros(num_ranks, T, dtype=torch.bool, device=slots_R.device)
    needed_nT[rank_R[valid], token_R[valid]] = True
    unique_per_rank = needed_nT.sum(1)
    position_nT = (torch.cumsum(needed_nT.flatten(), 0) - 1).view(num_ranks, T)
    rank_starts = torch.cumsum(unique_per_rank, 0) - unique_per_rank
    index_R = position_nT[rank_R, token_R] - rank_starts[rank_R]
    return DestinationRows(needed_nT, torch.where(valid, index_R, -1), unique_per_rank)


def max_destination_ranks(
    num_experts: int, topk: int, num_groups: int, group_topk: int, num_ranks: int
) -> int:
    """Most ep ranks one token's K experts can sit on (rank j owns a contiguous E / n block).

    Without groups: min(K, n). With group-limited routing a token's experts lie in `group_topk`
    groups, so at most the ranks those groups touch: DeepSeek-V3's node-limited routing is this
    bound with groups aligned to ranks (or to nodes of ranks). A group that straddles a rank
    boundary counts every rank it touches, so misaligned groups loosen the bound.
    """
    if not num_groups:
        return min(topk, num_ranks)
    per_group, per_rank = num_experts // num_groups, num_experts // num_ranks
    touched = sorted(
        ((g + 1) * per_group - 1) // per_rank - g * per_group // per_rank + 1
        for g in range(num_groups)
    )
    return min(topk, num_ranks, sum(touched[-group_topk:]))


def expected_destination_ranks(
    num_experts: int, topk: int, num_groups: int, group_topk: int, num_ranks: int
) -> float:
    """Mean ep ranks a token's K experts sit on under uniform routing: the rows per token of the
    dedup dispatcher (the planner's all-to-all volume).

    Without groups: n * (1 - C(E - e, K) / C(E, K)), e = E / n experts per rank, K drawn
    without replacement. With groups aligned to ranks (each group one or more whole ranks) the
    K are drawn from the M kept groups' experts, over the ranks those groups cover; otherwise
    the ungrouped figure, capped by `max_destination_ranks`.
    """
    per_rank = num_experts // num_ranks

    def spread(experts: int, ranks: int) -> float:
        miss = math.comb(experts - per_rank, topk) / math.comb(experts, topk)
        return ranks * (1.0 - miss)

    bound = max_destination_ranks(num_experts, topk, num_groups, group_topk, num_ranks)
    if num_groups and num_ranks % num_groups == 0:
        ranks = group_topk * num_ranks // num_groups
        return min(spread(ranks * per_rank, ranks), bound)
    return min(spread(num_experts, num_ranks), bound)
