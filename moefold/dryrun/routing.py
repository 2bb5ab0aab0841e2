"""RoutingOverride: the routing a dry run assumes, since fake tensors carry no values.

The router still runs (its shapes and memory are real); only the counts that size the
dispatch come from a rule instead of from the routed ids:
- balanced: every expert gets the same share of each rank's token-slots;
- skewed:F: one expert (expert 0) gets the share F, the others share the rest evenly.
Every source rank routes the same way, so the split sizes of the all-to-all follow from the
counts without the count exchange's values (the exchange still runs, so its traffic counts).
The counts it hands back are small real host tensors, created outside fake mode, so the
dispatch and expert code can read them as Python ints exactly as in a real run.

A dispatcher uses it when its `routing_override` attribute is set (moefold/dryrun/step.py sets
it on every dispatcher of the dry-run model); nothing global changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from moefold.config import ConfigError, MoEConfig
from moefold.dispatch.routing import SlotRouting, expert_capacity


def parse_routing(text: str) -> float | None:
    """--routing: "balanced" -> None, "skewed:F" (0 < F <= 1) -> F."""
    if text == "balanced":
        return None
    if text.startswith("skewed:"):
        try:
            share = float(text.split(":", 1)[1])
        except ValueError:
            share = -1.0
        if 0.0 < share <= 1.0:
            return share
    raise ConfigError(
        f"--routing: {text!r} is not 'balanced' or 'skewed:F' with 0 < F <= 1 "
        "(e.g. skewed:0.5 puts half of every rank's token-slots on one expert)"
    )


def _host(values) -> torch.Tensor:
    with unset_fake_temporarily():
        return torch.tensor(values, dtype=torch.long)


@dataclass(frozen=True)
class RoutingOverride:
    skew: float | None = None  # None: balanced; else the share of slots on expert 0

    def expert_counts(self, num_slots: int, num_experts: int) -> list[int]:
        """Token-slots each expert gets from one rank (they add up to num_slots)."""
        if self.skew is None or num_experts == 1:
            hot, rest, others = 0, num_slots, list(range(num_experts))
        else:
            hot = min(num_slots, round(self.skew * num_slots))
            rest, others = num_slots - hot, list(range(1, num_experts))
        counts = [0] * num_experts
        if self.skew is not None and num_experts > 1:
            counts[0] = hot
        for i, expert in enumerate(others):
            counts[expert] = rest // len(others) + (i < rest % len(others))
        return counts

    def route(self, expert_ids_TK: torch.Tensor, cfg: MoEConfig) -> SlotRouting:
        """What route_slots would return for these counts: capacity clips each expert, padding
        fills every expert to the capacity. Rows are shaped exactly; which slot a row holds is
        immaterial (the values are fake)."""
        T, K = expert_ids_TK.shape
        counts = self.expert_counts(T * K, cfg.num_experts)
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(T, cfg.num_experts, K, cfg.capacity_factor)
            counts = [min(c, capacity) for c in counts]
        kept = sum(counts)
        order = torch.argsort(expert_ids_TK.flatten(), stable=True)[:kept]
        dropped = _host(T * K - kept)
        if cfg.capacity_factor is not None and cfg.pad_to_capacity:
            slots = order.new_full((cfg.num_experts * capacity,), -1)
            slots[:kept] = order
            return SlotRouting(slots, _host([capacity] * cfg.num_experts), dropped)
        return SlotRouting(order, _host(counts), dropped)

    def splits(self, sent_E: torch.Tensor, n: int, e: int, m: int, ep_rank: int):
        """(sent per ep rank, received per ep rank, rows per etp rank, received counts
        [m*n, e], rows per local expert [e]) when every rank sends the counts `sent_E` (the
        host tensor `route` made)."""
        with unset_fake_temporarily():
            counts = sent_E.tolist()
        blocks = [counts[j * e : (j + 1) * e] for j in range(n)]
        mine = blocks[ep_rank]  # what each source rank sends to this rank's experts
        received = [sum(mine)] * n
        per_expert = [c * n * m for c in mine]
        return (
            [sum(b) for b in blocks],
            received,
            [sum(received)] * m,
            _host([mine] * (m * n)),
            _host(per_expert),
        )
