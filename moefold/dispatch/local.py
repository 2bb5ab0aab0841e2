"""LocalDispatcher: all experts on this rank (EP = 1); the semantic reference for dispatchers.

Shape legend: T tokens, D model dim, K experts per token, E experts, R rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moefold.config import MoEConfig
from moefold.dispatch.routing import SlotRouting, route_slots


@dataclass(frozen=True)
class LocalPlan:
    token_index_R: torch.Tensor  # token of each row; T marks a padding row
    num_tokens: int
    num_dropped: torch.Tensor


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0, as `index_select`: its backward is an `index_add_`, where advanced
    indexing's is an accumulating `index_put_` - 2.7x slower for the whole gather fwd+bwd of
    4096 bf16 tokens x 1024 into 8192 rows on CPU (7 vs 19 ms, 2 threads)."""
    return x.index_select(0, index)


def gather_rows(
    hidden_TD: torch.Tensor, probs_TK: torch.Tensor, slots_R: torch.Tensor, padded: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows for the given slots (-1 = padding row of zeros with probability 0).

    Returns (rows_RD, probs_R, token_index_R) with token_index T for padding rows.
    """
    T, K = probs_TK.shape
    token_index = torch.where(slots_R >= 0, slots_R // K, T)
    probs_flat = probs_TK.flatten()
    if padded:
        hidden_TD = torch.cat([hidden_TD, hidden_TD.new_zeros(1, hidden_TD.shape[1])])
        probs_flat = torch.cat([probs_flat, probs_flat.new_zeros(1)])
        slots_R = torch.where(slots_R >= 0, slots_R, T * K)
    return take_rows(hidden_TD, token_index), take_rows(probs_flat, slots_R), token_index


def scatter_rows(
    rows_RD: torch.Tensor, token_index_R: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Sum rows into their tokens; rows with token index == num_tokens (padding) vanish."""
    out = rows_RD.new_zeros(num_tokens + 1, rows_RD.shape[1])
    return out.index_add(0, token_index_R, rows_RD)[:num_tokens]


def route_or_override(
    override, expert_ids_TK, probs_TK, num_experts: int, cfg: MoEConfig, num_sequences: int
) -> SlotRouting:
    """The slots of this call: `route_slots` on the router's choice, or, under the dry run, the
    counts its RoutingOverride (moefold/dryrun/routing.py) makes for tensors without values."""
    if override is not None:
        return override.route(expert_ids_TK, cfg)
    return route_slots(
        expert_ids_TK,
        probs_TK,
        num_experts,
        cfg.capacity_factor,
        cfg.drop_policy,
        cfg.pad_to_capacity,
        num_sequences,
    )


class LocalDispatcher:
    """Permutes tokens into expert-grouped rows and back, with capacity/drop/pad from config."""

    def __init__(self, cfg: MoEConfig) -> None:
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        # The dry run's RoutingOverride (moefold/dryrun/routing.py): counts instead of values.
        self.routing_override = None

    def dispatch(self, hidden_TD, probs_TK, expert_ids_TK, num_sequences: int = 1):
        routing = route_or_override(
            self.routing_override,
            expert_ids_TK,
            probs_TK,
            self.num_experts,
            self.cfg,
            num_sequences,
        )
        padded = self.cfg.pad_to_capacity and self.cfg.capacity_factor is not None
        rows_RD, probs_R, token_index_R = gather_rows(hidden_TD, probs_TK, routing.slots_R, padded)
        plan = LocalPlan(token_index_R, hidden_TD.shape[0], routing.num_dropped)
        return rows_RD, probs_R, routing.tokens_per_expert_E, plan

    def combine(self, expert_output_RD: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        return scatter_rows(expert_output_RD, plan.token_index_R, plan.num_tokens)
