"""DedupAllToAllDispatcher: all-to-all dispatch that sends a token once per destination ep rank.

Shape legend: T local tokens, D model dim, K experts per token, E experts in total,
e local experts, n ep size, m etp size, R slot rows (one per kept (token, expert) pair, plus
padding), U unique rows (one per (token, destination rank)), B = m * n source blocks.

The plain all-to-all dispatcher sends one row per slot, so a token whose K experts share a
rank travels there up to K times. Here (DeepEP's scheme, on any backend):

dispatch: route locally (capacity per source rank, as in the plain dispatcher) -> per
destination rank, the tokens it needs once (`routing.destination_rows`) -> exchange per-expert
slot counts and unique-row counts together -> all-to-all the unique rows over ep, and per slot
only its probability and the index of its unique row (one [R, 2] fp32 tensor) -> all-gather
over etp -> expand the unique rows into expert-grouped rows locally (a gather, no
communication). The expert rows equal the plain dispatcher's, in the same order.
combine: sum each received token's expert rows (the experts already weighted them by their
probabilities) -> reduce-scatter over etp -> all-to-all one row per (token, rank) back -> sum
the rows of each token. Padding rows never travel: they point at a zero row on the
destination. Autograd runs through every step: the local expansion's backward sums a token's
expert-row gradients on the destination, so the backward also moves one row per unique row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from moefold.config import MoEConfig
from moefold.dispatch.all_to_all import gather_counts_over_etp, source_to_expert_order
from moefold.dispatch.local import scatter_rows, take_rows
from moefold.dispatch.routing import destination_rows, route_slots
from moefold.parallel.comm import (
    CommStats,
    all_gather_dim,
    all_to_all,
    exchange_counts,
    reduce_scatter_dim,
)


@dataclass(frozen=True)
class DedupPlan:
    token_index_U: torch.Tensor  # source token of each unique row this rank sent
    num_tokens: int
    num_dropped: torch.Tensor
    unique_sent: list[int]  # unique rows sent to each ep rank
    unique_received: list[int]  # unique rows received from each ep rank
    unique_etp_sizes: list[int]  # unique rows held by each etp rank after the all-to-all
    row_index_R: torch.Tensor  # unique row of each expert row (num_unique marks padding)
    num_unique: int  # unique rows after the etp gather


@dataclass(frozen=True)
class SplitSizes:
    """Host-side split sizes of one dispatch, read from the count tables in one sync."""

    slot_sent: list[int]  # slot rows (probabilities, indices) sent to each ep rank
    slot_received: list[int]  # slot rows received from each ep rank
    slot_etp: list[int]  # slot rows held by each etp rank after the all-to-all
    unique_sent: list[int]
    unique_received: list[int]
    unique_etp: list[int]


def split_sizes(
    sent_nc: torch.Tensor, received_Bc: torch.Tensor, ep_size: int, etp_rank: int
) -> SplitSizes:
    """Count tables [n, e + 1] (sent) and [B, e + 1] (received, etp-major) -> split lists.

    Column e holds unique rows, the others slot rows per local expert.
    """
    # The one device-to-host sync of dispatch: collective split sizes are Python ints.
    sizes = torch.cat([sent_nc.flatten(), received_Bc.flatten()]).tolist()
    width = sent_nc.shape[1]
    rows = [sizes[i : i + width] for i in range(0, len(sizes), width)]
    sent, received = rows[:ep_size], rows[ep_size:]
    own = received[etp_rank * ep_size : (etp_rank + 1) * ep_size]
    per_etp = [received[i : i + ep_size] for i in range(0, len(received), ep_size)]
    return SplitSizes(
        slot_sent=[sum(r[:-1]) for r in sent],
        slot_received=[sum(r[:-1]) for r in own],
        slot_etp=[sum(sum(r[:-1]) for r in block) for block in per_etp],
        unique_sent=[r[-1] for r in sent],
        unique_received=[r[-1] for r in own],
        unique_etp=[sum(r[-1] for r in block) for block in per_etp],
    )


def slot_metadata(
    probs_TK: torch.Tensor, slots_R: torch.Tensor, unique_index_R: torch.Tensor
) -> torch.Tensor:
    """[R, 2] fp32: each slot row's probability (0 for padding) and its unique-row index.

    One tensor, so one all-to-all carries both. The index (below T, or -1) is exact in fp32
    up to 2**24; the gradient reaches the probabilities through column 0.
    """
    assert probs_TK.shape[0] < 2**24, "unique-row indices must be exact in float32"
    probs = probs_TK.flatten()[slots_R.clamp(min=0)].float()
    probs = torch.where(slots_R >= 0, probs, torch.zeros_like(probs))
    return torch.stack([probs, unique_index_R.float()], 1)


def expert_row_index(
    index_R: torch.Tensor, received_Bc: torch.Tensor, sizes: SplitSizes
) -> torch.Tensor:
    """Per received slot row (source-major): the received unique row it expands, or U (padding).

    `index_R` counts within the source block's unique rows; blocks are laid out in the order
    of `received_Bc`'s rows, the same order as the gathered unique rows.
    """
    unique_B = received_Bc[:, -1]
    slots_B = received_Bc[:, :-1].sum(1)
    offsets_B = torch.cumsum(unique_B, 0) - unique_B
    blocks = torch.arange(received_Bc.shape[0], device=index_R.device)
    block_R = torch.repeat_interleave(blocks, slots_B, output_size=sum(sizes.slot_etp))
    index_R = index_R.long()
    return torch.where(index_R >= 0, index_R + offsets_B[block_R], sum(sizes.unique_etp))


class DedupAllToAllDispatcher:
    """Expert parallelism over `ep_group` (etp over `etp_group`), one row per token and rank."""

    def __init__(
        self,
        cfg: MoEConfig,
        ep_group: ProcessGroup,
        etp_group: ProcessGroup,
        stats: CommStats | None = None,
    ) -> None:
        self.cfg = cfg
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep_size = ep_group.size()
        self.num_local_experts = cfg.num_experts // self.ep_size
        self.stats = stats

    def _all_to_all(self, x, received: list[int], sent: list[int]) -> torch.Tensor:
        return all_to_all(x, received, sent, self.ep_group, family="ep", stats=self.stats)

    def _gather_etp(self, x, sizes: list[int]) -> torch.Tensor:
        return all_gather_dim(x, 0, self.etp_group, sizes=sizes, family="etp", stats=self.stats)

    def dispatch(self, hidden_TD, probs_TK, expert_ids_TK, num_sequences: int = 1):
        cfg, n, e = self.cfg, self.ep_size, self.num_local_experts
        routing = route_slots(
            expert_ids_TK,
            probs_TK,
            cfg.num_experts,
            cfg.capacity_factor,
            cfg.drop_policy,
            cfg.pad_to_capacity,
            num_sequences,
        )
        destinations = destination_rows(routing.slots_R, expert_ids_TK, e, n)
        sent_nc = torch.cat(
            [routing.tokens_per_expert_E.view(n, e), destinations.unique_per_rank_n[:, None]], 1
        )
        received = exchange_counts(sent_nc.flatten(), self.ep_group, family="ep", stats=self.stats)
        received_Bc = gather_counts_over_etp(received.view(n, e + 1), self.etp_group, self.stats)
        sizes = split_sizes(sent_nc, received_Bc, n, self.etp_group.rank())

        token_index_U = destinations.token_index(sum(sizes.unique_sent))
        unique_UD = self._all_to_all(
            take_rows(hidden_TD, token_index_U), sizes.unique_received, sizes.unique_sent
        )
        meta_R2 = slot_metadata(probs_TK, routing.slots_R, destinations.unique_index_R)
        meta_R2 = self._all_to_all(meta_R2, sizes.slot_received, sizes.slot_sent)
        unique_UD = self._gather_etp(unique_UD, sizes.unique_etp)
        meta_R2 = self._gather_etp(meta_R2, sizes.slot_etp)
        probs_R, index_R = meta_R2[:, 0].to(probs_TK.dtype), meta_R2[:, 1].detach()

        counts_Be = received_Bc[:, :e]
        sort_index = source_to_expert_order(counts_Be, sum(sizes.slot_etp))
        row_index_R = expert_row_index(index_R, received_Bc, sizes)[sort_index]
        num_unique = unique_UD.shape[0]
        if cfg.pad_to_capacity and cfg.capacity_factor is not None:
            unique_UD = torch.cat([unique_UD, unique_UD.new_zeros(1, unique_UD.shape[1])])
        plan = DedupPlan(
            token_index_U,
            hidden_TD.shape[0],
            routing.num_dropped,
            sizes.unique_sent,
            sizes.unique_received,
            sizes.unique_etp,
            row_index_R,
            num_unique,
        )
        rows_RD, probs_R = take_rows(unique_UD, row_index_R), take_rows(probs_R, sort_index)
        return rows_RD, probs_R, counts_Be.sum(0), plan

    def combine(self, expert_output_RD: torch.Tensor, plan: DedupPlan) -> torch.Tensor:
        # Sum each received token's expert rows here, so that one row per token travels back.
        unique_UD = scatter_rows(expert_output_RD, plan.row_index_R, plan.num_unique)
        unique_UD = reduce_scatter_dim(
            unique_UD,
            0,
            self.etp_group,
            sizes=plan.unique_etp_sizes,
            family="etp",
            stats=self.stats,
        )
        unique_UD = self._all_to_all(unique_UD, plan.unique_sent, plan.unique_received)
        return scatter_rows(unique_UD, plan.token_index_U, plan.num_tokens)
