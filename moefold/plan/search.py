"""Enumerate every legal layout of a job on N devices, place its groups on nodes, rank them.

Legality mirrors `check_job` (tests/unit/test_plan.py checks that every candidate passes it).
Folded layouts choose the expert view freely (ep, etp with ep * etp dividing a stage); the
pre-folding rules (`fold=False`) keep etp = tp and take the ep groups from the dense dp groups,
ep consecutive dp ranks at a time, so ep ranks are strided by tp * cp (Megatron before folding).
Whether a group crosses nodes is read off the real group membership of `ParallelLayout`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from moefold.parallel.layout import ParallelLayout, View
from moefold.plan.cost import Candidate, CostModel, Estimate, GroupSpan, Topology, Workload
from moefold.plan.hardware import Device

MAX_MICRO_BATCH = 16  # larger micro-batches only add activation memory at these shapes


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(
    w: Workload, world_size: int, *, fold: bool = True, max_tp: int = 8
) -> Iterator[Candidate]:
    """Every legal candidate: degrees of both views, vpp, micro-batch, recompute, optimizer."""
    for group in enumerate_layouts(w, world_size, fold=fold, max_tp=max_tp):
        for base in group:
            yield from variants(base)


def enumerate_layouts(
    w: Workload, world_size: int, *, fold: bool = True, max_tp: int = 8
) -> Iterator[list[Candidate]]:
    """Every legal layout and micro-batch, as the list of its legal vpp values (ascending),
    with recompute off and the distributed optimizer on (`variants` adds those two knobs).

    Args:
        w: the workload (model, sequence length, global batch).
        world_size: number of devices.
        fold: False keeps the pre-folding rules (etp = tp, ep divides dp, ep strided by tp*cp).
        max_tp: largest tp and etp tried (a node: tensor parallelism across nodes never pays).
    """
    model = w.model
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


def _expert_degrees(
    w: Workload, stage: int, tp: int, dp: int, fold: bool, max_tp: int
) -> Iterator[tuple[int, int]]:
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


def _schedules(
    w: Workload, pp: int, tp: int, cp: int, dp: int, ep: int, etp: int, edp: int, fold: bool
) -> Iterator[list[Candidate]]:
    """Per micro-batch size, its virtual-stage choices; recompute off, distributed optimizer
    on."""
    per_dp_rank = w.global_batch // dp
    for micro_batch in divisors(per_dp_rank):
        if micro_batch > MAX_MICRO_BATCH:
            break
        num_microbatches = per_dp_rank // micro_batch
        yield [
            Candidate(
                tp=tp,
                cp=cp,
                pp=pp,
                vpp=vpp,
                dp=dp,
                ep=ep,
                etp=etp,
                edp=edp,
                micro_batch=micro_batch,
                recompute=False,
                distributed_optimizer=True,
                folded=fold,
            )
            for vpp in (divisors(w.model.layers // pp) if pp > 1 else [1])
            # interleaving needs whole rounds of pp micro-batches
            if vpp == 1 or num_microbatches % pp == 0
        ]


def variants(base: Candidate) -> list[Candidate]:
    """`base` with recompute off/on and the distributed optimizer on/off."""
    return [
        replace(base, recompute=recompute, distributed_optimizer=sharded)
        for recompute in (False, True)
        for sharded in (True, False)
    ]


# ---- node placement ----------------------------------------------------------------------------


def _span(groups: np.ndarray, nodes_of: int) -> GroupSpan:
    """Worst node spread over `groups` ([groups, size] ranks). Rows are shifted copies of one offset
    pattern, so a pattern is checked once per start position within a node."""
    size = groups.shape[1]
    worst = GroupSpan(size, 1, 0.0)
    if size == 1:
        return worst
    offsets = groups[0] - groups[0, 0]
    assert np.array_equal(groups - groups[:, :1], np.broadcast_to(offsets, groups.shape))
    for start in np.unique(groups[:, 0] % nodes_of):
        node_of = (int(start) + offsets) // nodes_of
        _, members = np.unique(node_of, return_counts=True)
        if len(members) == 1:
            continue
        fewest = int(members.min())
        off = 1 - (fewest - 1) / (size - 1)
        if (len(members), off) > (worst.nodes, worst.off_node):
            worst = GroupSpan(size, len(members), off, fewest)
    return worst


def _groups(ranks: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Rows of ranks varying over `axes` of a rank tensor, the other axes fixed."""
    fixed = [a for a in range(ranks.ndim) if a not in axes]
    size = int(np.prod([ranks.shape[a] for a in axes]))
    return np.transpose(ranks, fixed + list(axes)).reshape(-1, size)


def _rank_tensor(layout: ParallelLayout, view: View) -> np.ndarray:
    return np.array(layout.rank_tensor(view)).reshape(layout.shape(view))


@lru_cache(maxsize=4096)
def _dense_spans(world_size: int, tp: int, cp: int, pp: int, nodes_of: int) -> tuple:
    """(tp, cp, dp x cp, dp x cp x tp, pp) spans of the dense view (pp, dp, cp, tp)."""
    dense = _rank_tensor(ParallelLayout.build(world_size, tp=tp, cp=cp, pp=pp), "dense")
    nodes = dense // nodes_of
    crossing = float(np.mean(nodes[1:] != nodes[:-1])) if pp > 1 else 0.0
    pp_span = GroupSpan(pp, 2 if crossing else 1, crossing)  # a rank and its next stage
    return (
        _span(_groups(dense, (3,)), nodes_of),
        _span(_groups(dense, (2,)), nodes_of),
        _span(_groups(dense, (1, 2)), nodes_of),
        _span(_groups(dense, (1, 2, 3)), nodes_of),
        pp_span,
    )


@lru_cache(maxsize=4096)
def _expert_spans(world_size: int, pp: int, ep: int, etp: int, nodes_of: int) -> tuple:
    """(ep, etp, edp) spans of the folded expert view (pp, edp, ep, etp)."""
    expert = _rank_tensor(ParallelLayout.build(world_size, pp=pp, ep=ep, etp=etp), "expert")
    return tuple(_span(_groups(expert, (axis,)), nodes_of) for axis in (2, 3, 1))


@lru_cache(maxsize=4096)
def _pre_folding_spans(world_size: int, tp: int, cp: int, pp: int, ep: int, nodes_of: int) -> tuple:
    """(ep, etp, edp) spans before folding: ep groups are ep consecutive ranks of each dense dp
    group (stride tp*cp), etp groups the tp groups, edp groups one position of every dp chunk
    over all cp ranks (Megatron before folding)."""
    layout = ParallelLayout.build(world_size, tp=tp, cp=cp, pp=pp)
    chunked = _rank_tensor(layout, "dense").reshape(pp, layout.dp // ep, ep, cp, tp)
    return (
        _span(_groups(chunked, (2,)), nodes_of),
        _span(_groups(chunked, (4,)), nodes_of),
        _span(_groups(chunked, (1, 3)), nodes_of),
    )


@lru_cache(maxsize=65536)
def topology(
    world_size: int, tp: int, cp: int, pp: int, ep: int, etp: int, folded: bool, nodes_of: int
) -> Topology:
    """Node placement of every family, read off ParallelLayout's rank tensors."""
    tp_span, cp_span, dp_span, dp_tp_span, pp_span = _dense_spans(world_size, tp, cp, pp, nodes_of)
    if folded:
        ep_span, etp_span, edp_span = _expert_spans(world_size, pp, ep, etp, nodes_of)
    else:
        assert etp == tp, "before folding etp is tp"
        ep_span, etp_span, edp_span = _pre_folding_spans(world_size, tp, cp, pp, ep, nodes_of)
    return Topology(
        tp=tp_span,
        cp=cp_span,
        dp=dp_span,
        dp_tp=dp_tp_span,
        ep=ep_span,
        etp=etp_span,
        edp=edp_span,
        pp=pp_span,
    )


# ---- ranking -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Fitting candidates, fastest first, and how many were legal and evaluated."""

    ranked: list[Estimate]
    num_candidates: int  # legal candidates (every knob)
    num_evaluated: int  # after dropping dominated knobs (see `plan`)
    num_fitting: int


def plan(
    w: Workload,
    world_size: int,
    device: Device,
    *,
    nodes_of: int,
    fold: bool = True,
    top: int | None = None,
) -> Plan:
    """Estimate every legal candidate that is not dominated, keep those that fit, sort by time.

    Dominated, so never estimated (the model is monotone in these knobs):
    - the distributed optimizer off: more memory, at least as much time as on;
    - recompute on, when the same candidate fits without it: slower;
    - on devices that overlap communication (GPUs), any vpp below the largest that fits with
      the same recompute setting: a larger vpp only shrinks the bubble, and interleaved
      transfers are hidden. On CPU every vpp is estimated (moefold's transfers block).
    With ByteGrad the distributed optimizer is no longer free of cost (its parameter
    all-gather stays full precision while the replicated one gathers 1-byte codes), so each
    fitting candidate is also estimated with it off, and the faster of the two is kept.
    """
    model = CostModel(w, device)
    fitting, counts = [], [0, 0]  # legal candidates, estimates made
    for group in enumerate_layouts(w, world_size, fold=fold, max_tp=nodes_of):
        counts[0] += 4 * len(group)
        first = group[0]
        topo = topology(
            world_size, first.tp, first.cp, first.pp, first.ep, first.etp, first.folded, nodes_of
        )
        if device.overlap:
            fitting += _largest_fitting_vpp(model, group, topo, counts)
        else:
            for base in group:
                fitting += _largest_fitting_vpp(model, [base], topo, counts)
    if w.grad_compression == "bytegrad":
        fitting = [_faster_replicated(model, e, world_size, nodes_of, counts) for e in fitting]
    fitting.sort(key=lambda e: (e.step_time, e.candidate))
    return Plan(
        ranked=fitting[:top] if top else fitting,
        num_candidates=counts[0],
        num_evaluated=counts[1],
        num_fitting=len(fitting),
    )


def _faster_replicated(
    model: CostModel, e: Estimate, world_size: int, nodes_of: int, counts: list[int]
) -> Estimate:
    """`e`, or its candidate with the distributed optimizer off where that fits and is faster."""
    c = replace(e.candidate, distributed_optimizer=False)
    counts[1] += 1
    other = model.estimate(c, _topology_of(c, world_size, nodes_of))
    return other if other.fits and other.step_time < e.step_time else e


def _topology_of(c: Candidate, world_size: int, nodes_of: int) -> Topology:
    return topology(world_size, c.tp, c.cp, c.pp, c.ep, c.etp, c.folded, nodes_of)


def estimate_candidate(
    w: Workload, world_size: int, device: Device, c: Candidate, *, nodes_of: int
) -> Estimate:
    """One candidate's estimate under `w` (fitting or not), e.g. to compare two workloads."""
    return CostModel(w, device).estimate(c, _topology_of(c, world_size, nodes_of), always=True)


def _largest_fitting_vpp(
    model: CostModel, group: list[Candidate], topo: Topology, counts: list[int]
) -> list[Estimate]:
    """Without recompute, the largest vpp of `group` that fits; with recompute, the largest
    that fits only if it is larger (else the candidate without recompute is faster)."""
    found: list[Estimate] = []
    floor = -1
    for recompute in (False, True):
        for base in reversed(group):
            if base.vpp <= floor:
                break
            counts[1] += 1
            candidate = replace(base, recompute=True) if recompute else base
            memory = model.memory(candidate, topo)
            if memory["total"] <= model.device.memory_bytes:
                found.append(model.estimate(candidate, topo, memory=memory))
                floor = base.vpp
                break
    return found
