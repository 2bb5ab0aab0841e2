"""Enumerate every legal layout of a job on N devices, place its groups on nodes, rank them.

Legality mirrors `check_job` (tests/unit/test_plan.py checks that every candidate passes it).
Folded layouts choose the expert view freely (ep, etp with ep * etp dividing a stage); the
pre-folding rules (`fold=False`) keep etp = tp and take the ep groups from the dense dp groups,
ep consecutive dp ranks at a time, so ep ranks are strided by tp * cp (Megatron before folding).
Whether a group crosses nodes is read off the real group membership of `ParallelLayout`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from moefold.parallel.layout import ParallelLayout
from moefold.plan.cost import Candidate, Estimate, GroupSpan, Topology, Workload, estimate
from moefold.plan.hardware import Device

MAX_MICRO_BATCH = 16  # larger micro-batches only add activation memory at these shapes


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(w: Workload, world_size: int, *, fold: bool = True,
                         max_tp: int = 8) -> Iterator[Candidate]:
    """Every legal candidate: degrees of both views, vpp, micro-batch, recompute, optimizer.

    Args:
        w: the workload (model, sequence length, global batch).
        world_size: number of devices.
        fold: False keeps the pre-folding rules (etp = tp, ep divides dp, ep strided by tp*cp).
        max_tp: largest tp and etp tried (a node: tensor parallelism across nodes never pays).
    """
    model, moe = w.model, w.moe
    for pp in divisors(world_size):
        if model.layers % pp or (pp > 1 and model.tie_embeddings):
            continue
        stage = world_size // pp
        for tp in divisors(stage):
            if tp > max_tp or model.heads % tp or model.kv_heads % tp or model.ffn_hidden % tp:
                continue
            for cp in divisors(stage // tp):
                if w.seq_len % (tp * 2 * cp if cp > 1 else tp):
                    continue
                dp = stage // (tp * cp)
                if w.global_batch % dp:
                    continue
                for ep, etp in _expert_degrees(w, stage, tp, dp, fold, max_tp):
                    yield from _schedules(w, pp, tp, cp, dp, ep, etp, stage // (ep * etp), fold)


def _expert_degrees(w: Workload, stage: int, tp: int, dp: int, fold: bool,
                    max_tp: int) -> Iterator[tuple[int, int]]:
    moe = w.moe
    if not moe.enabled:
        yield 1, 1
        return
    for ep in divisors(moe.num_experts):
        if stage % ep:
            continue
        if not fold:
            if dp % ep == 0 and moe.ffn_hidden % tp == 0:
                yield ep, tp
            continue
        for etp in divisors(stage // ep):
            if etp <= max_tp and moe.ffn_hidden % etp == 0:
                yield ep, etp


def _schedules(w: Workload, pp: int, tp: int, cp: int, dp: int, ep: int, etp: int, edp: int,
               fold: bool) -> Iterator[Candidate]:
    per_dp_rank = w.global_batch // dp
    for micro_batch in divisors(per_dp_rank):
        if micro_batch > MAX_MICRO_BATCH:
            break
        num_microbatches = per_dp_rank // micro_batch
        for vpp in divisors(w.model.layers // pp) if pp > 1 else [1]:
            if vpp > 1 and num_microbatches % pp:  # interleaving needs whole rounds of pp
                continue
            for recompute in (False, True):
                for distributed_optimizer in (True, False):
                    yield Candidate(tp=tp, cp=cp, pp=pp, vpp=vpp, dp=dp, ep=ep, etp=etp, edp=edp,
                                    micro_batch=micro_batch, recompute=recompute,
                                    distributed_optimizer=distributed_optimizer, folded=fold)


# ---- node placement ----------------------------------------------------------------------------


def _span(groups: list[list[int]], nodes_of: int) -> GroupSpan:
    """Worst node spread over `groups`; groups equal up to a shift are checked once."""
    size = len(groups[0])
    worst = GroupSpan(size, 1, 0.0)
    if size == 1:
        return worst
    shapes = {(group[0] % nodes_of, tuple(r - group[0] for r in group)) for group in groups}
    for start, offsets in shapes:
        node_of = [(start + offset) // nodes_of for offset in offsets]
        nodes = len(set(node_of))
        if nodes == 1:
            continue
        off = max(1 - (node_of.count(n) - 1) / (size - 1) for n in set(node_of))
        if (nodes, off) > (worst.nodes, worst.off_node):
            worst = GroupSpan(size, nodes, off)
    return worst


def _pp_span(groups: list[list[int]], nodes_of: int) -> GroupSpan:
    """Whether a rank and its next stage sit on different nodes."""
    crossing = sum(
        a // nodes_of != b // nodes_of for group in groups for a, b in zip(group, group[1:])
    )
    pairs = sum(len(group) - 1 for group in groups) or 1
    return GroupSpan(len(groups[0]), 2 if crossing else 1, crossing / pairs)


def _pre_folding_expert_groups(layout: ParallelLayout, ep: int) -> tuple[list, list]:
    """(ep groups, edp groups) of the pre-folding mapping: ep consecutive ranks of each dense dp
    group (stride tp*cp); edp: the same position in every dp chunk, over all cp ranks."""
    ep_groups = [
        group[start : start + ep]
        for group in layout.groups(("dp",), "dense")
        for start in range(0, len(group), ep)
    ]
    edp_groups = []
    for group in layout.groups(("dp", "cp"), "dense"):  # ordered (dp, cp) row-major
        for position in range(ep):
            edp_groups.append(
                [r for i, r in enumerate(group) if (i // layout.cp) % ep == position]
            )
    return ep_groups, edp_groups


@lru_cache(maxsize=4096)
def topology(world_size: int, tp: int, cp: int, pp: int, ep: int, etp: int, folded: bool,
             nodes_of: int) -> Topology:
    """Node placement of every family, from ParallelLayout's group membership."""
    layout = ParallelLayout.build(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
    if folded:
        ep_groups = layout.groups(("ep",), "expert")
        edp_groups = layout.groups(("edp",), "expert")
        etp_groups = layout.groups(("etp",), "expert")
    else:
        ep_groups, edp_groups = _pre_folding_expert_groups(layout, ep)
        etp_groups = layout.groups(("tp",), "dense")
    return Topology(
        tp=_span(layout.groups(("tp",), "dense"), nodes_of),
        cp=_span(layout.groups(("cp",), "dense"), nodes_of),
        dp=_span(layout.groups(("dp", "cp"), "dense"), nodes_of),
        ep=_span(ep_groups, nodes_of),
        etp=_span(etp_groups, nodes_of),
        edp=_span(edp_groups, nodes_of),
        pp=_pp_span(layout.groups(("pp",), "dense"), nodes_of),
    )


# ---- ranking -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """All fitting candidates, fastest first, and how many were tried."""

    ranked: list[Estimate]
    num_candidates: int
    num_fitting: int


def plan(w: Workload, world_size: int, device: Device, *, nodes_of: int, fold: bool = True,
         top: int | None = None) -> Plan:
    """Estimate every legal candidate, drop those that do not fit, sort by step time."""
    fitting, count = [], 0
    for candidate in enumerate_candidates(w, world_size, fold=fold, max_tp=nodes_of):
        count += 1
        topo = topology(world_size, candidate.tp, candidate.cp, candidate.pp, candidate.ep,
                        candidate.etp, candidate.folded, nodes_of)
        result = estimate(w, candidate, topo, device)
        if result.fits:
            fitting.append(result)
    fitting.sort(key=lambda e: (e.step_time, e.candidate))
    return Plan(ranked=fitting[:top] if top else fitting, num_candidates=count,
                num_fitting=len(fitting))
