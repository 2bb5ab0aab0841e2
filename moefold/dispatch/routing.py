"""Pure index math for token routing: sort token-slots by expert, capacity, dropping, padding.

No communication happens here. Shape legend: T tokens, K experts per token, E experts,
R rows handed to the experts, C capacity (rows per expert).

A "slot" is one (token, choice) pair, numbered t * K + k. Rows are slots grouped by expert in
ascending expert order; inside an expert, rows keep token order. Capacity is counted per expert
on the tokens this rank routes (Megatron's rule): C = ceil(T * K / E * capacity_factor).
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


def keep_mask(
    expert_ids_TK: torch.Tensor,
    probs_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str,
) -> torch.Tensor:
    """Bool [T, K]: the slots an expert keeps when at most `capacity` rows fit.

    drop_policy "probs" keeps each expert's highest-probability slots (ties: earlier token);
    "position" keeps its earliest tokens.
    """
    flat_ids = expert_ids_TK.flatten()
    if drop_policy == "probs":
        priority = torch.argsort(-probs_TK.detach().flatten(), stable=True)
    else:
        priority = torch.arange(flat_ids.numel(), device=flat_ids.device)
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
) -> SlotRouting:
    """Group slots by expert, applying capacity, dropping and padding from the MoE config."""
    T, K = expert_ids_TK.shape
    flat_ids = expert_ids_TK.flatten()
    if capacity_factor is None:
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=num_experts)
        return SlotRouting(order, counts, torch.zeros((), dtype=torch.long, device=flat_ids.device))
    capacity = expert_capacity(T, num_experts, K, capacity_factor)
    keep = keep_mask(expert_ids_TK, probs_TK, num_experts, capacity, drop_policy).flatten()
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
