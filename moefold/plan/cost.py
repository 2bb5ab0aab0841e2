"""Analytical cost of one training step of a layout: compute, communication, bubble, memory.

Everything is per rank and per optimizer step unless a name says otherwise. The model and its
constants are documented in docs/planner.md; FLOPs follow moefold/model/size.py (the MFU
formula), so predicted MFU and the MFU a run reports divide the same numerator.

Notation: b micro-batch, S sequence, D hidden, H / KV heads, hd head dim, F dense FFN, E experts,
K top-k, Fe / Fs routed / shared expert FFN, V vocab; t = b*S/(cp*tp) tokens a rank holds
(sequence parallel), q = b*S/cp tokens a tp group computes on, e = E/ep local experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from moefold.config import ModelConfig, MoEConfig
from moefold.model.size import flops_per_token
from moefold.plan.hardware import Device

# ---- global constants (docs/planner.md, "Constants") -----------------------------------------
COLLECTIVE_EFFICIENCY = 0.80  # achieved / link bandwidth of ring all-gather, reduce-scatter
ALL_TO_ALL_EFFICIENCY = 0.60  # achieved / link bandwidth of all-to-all (many small messages)
TP_OVERLAP = 0.50  # share of tp all-gather / reduce-scatter hidden behind GEMMs (overlap runtimes)
DROPLESS_IMBALANCE = 1.15  # busiest rank's routed rows / mean, dropless with a balancing loss
ELEMENTWISE_PASSES = 4  # memory passes per saved activation byte (fwd write, bwd read, grad r/w)
# aten ops per layer, forward + backward, counted in moefold on CPU (docs/planner.md)
OPS_ATTENTION, OPS_DENSE_MLP, OPS_MOE, OPS_PER_LOCAL_EXPERT, OPS_DISPATCH = 147, 74, 149, 28, 40
FAMILIES = ("tp", "cp", "ep", "etp", "pp", "dp", "edp")


@dataclass(frozen=True, kw_only=True, order=True)
class Candidate:
    """One point of the search space: both views' degrees and the schedule knobs."""

    tp: int
    cp: int
    pp: int
    vpp: int
    dp: int
    ep: int
    etp: int
    edp: int
    micro_batch: int
    recompute: bool  # full activation recompute of every layer
    distributed_optimizer: bool  # optimizer state sharded over dp*cp (dense) / edp (experts)
    folded: bool = True  # False: the pre-folding mapping (ep = chunks of dp, etp = tp)

    @property
    def label(self) -> str:
        dense = f"tp{self.tp} cp{self.cp} pp{self.pp} dp{self.dp}"
        return f"{dense} | etp{self.etp} ep{self.ep} edp{self.edp}"


@dataclass(frozen=True)
class GroupSpan:
    """How one family's groups sit on nodes (worst group of the family)."""

    size: int
    nodes: int  # nodes the group spans
    off_node: float  # fraction of a member's peers on other nodes


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Node placement of every communicating family of one layout (see search.topology)."""

    tp: GroupSpan
    cp: GroupSpan
    dp: GroupSpan  # dense gradients: dp x cp
    ep: GroupSpan
    etp: GroupSpan
    edp: GroupSpan
    pp: GroupSpan  # a rank and its next pipeline stage


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What is trained: the model, the step shape and the dtype."""

    model: ModelConfig
    moe: MoEConfig  # capacity_factor None = dropless
    seq_len: int
    global_batch: int
    dtype: str = "bf16"  # "bf16": bf16 weights + fp32 main grads/master (Megatron); or "fp32"

    @property
    def act_bytes(self) -> int:
        return 2 if self.dtype == "bf16" else 4

    @property
    def expert_load(self) -> float:
        """Routed rows on the busiest rank / mean: capacity bounds it, dropless skews it."""
        cf = self.moe.capacity_factor
        if cf is None:
            return DROPLESS_IMBALANCE if self.moe.enabled else 1.0
        return cf if self.moe.pad_to_capacity else min(cf, DROPLESS_IMBALANCE)


@dataclass
class Estimate:
    """Predicted step of one candidate; times in seconds per step, memory in bytes per rank."""

    candidate: Candidate
    time: dict[str, float] = field(default_factory=dict)  # compute, tp.., bubble, optimizer
    memory: dict[str, float] = field(default_factory=dict)  # weights, gradients, .., total
    comm_bytes: dict[str, float] = field(default_factory=dict)  # bytes sent per family
    step_time: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    fits: bool = False


# ---- building blocks ---------------------------------------------------------------------------


def gemm_time(m: float, n: float, k: float, device: Device) -> float:
    """Seconds for one (m x k) @ (k x n) GEMM at a shape-dependent fraction of peak."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    g = device.gemm_half_dim
    efficiency = device.gemm_efficiency * (m / (m + g)) * (n / (n + g)) * (k / (k + g))
    return 2.0 * m * n * k / (device.peak_flops * efficiency)


def collective_time(nbytes: float, span: GroupSpan, device: Device, calls: float,
                    all_to_all: bool = False) -> float:
    """Seconds to send `nbytes` (this rank, ring or all-to-all) over the groups of `span`."""
    if span.size == 1 or nbytes <= 0:
        return 0.0
    crosses = span.nodes > 1
    latency = calls * (span.size - 1) * (
        device.inter_node_latency if crosses else device.intra_node_latency
    )
    if all_to_all:
        eff = ALL_TO_ALL_EFFICIENCY
        inside = nbytes * (1 - span.off_node) / (device.intra_node_bandwidth * eff)
        outside = nbytes * span.off_node / (device.inter_node_bandwidth * eff)
        return max(inside, outside) + latency
    bandwidth = device.inter_node_bandwidth if crosses else device.intra_node_bandwidth
    return nbytes / (bandwidth * COLLECTIVE_EFFICIENCY) + latency



# ---- one layer, one micro-batch ----------------------------------------------------------------


@dataclass
class LayerCost:
    """One layer, one micro-batch, one rank: seconds, bytes sent per family, saved activations."""

    compute: float = 0.0
    attention_core: float = 0.0  # the part cp's key/value exchange can hide behind
    comm: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0.0))
    sent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FAMILIES, 0.0))
    activations: float = 0.0  # bytes kept for the backward

    def scaled(self, factor: float) -> LayerCost:
        out = LayerCost(compute=self.compute * factor, attention_core=self.attention_core * factor,
                        activations=self.activations * factor)
        out.comm = {f: v * factor for f, v in self.comm.items()}
        out.sent = {f: v * factor for f, v in self.sent.items()}
        return out

    def add(self, other: LayerCost) -> LayerCost:
        total = LayerCost(
            compute=self.compute + other.compute,
            attention_core=self.attention_core + other.attention_core,
            activations=self.activations + other.activations,
        )
        for family in FAMILIES:
            total.comm[family] = self.comm[family] + other.comm[family]
            total.sent[family] = self.sent[family] + other.sent[family]
        return total


class _Layer:
    """Shapes and helpers shared by the blocks of one (workload, candidate, device)."""

    def __init__(self, w: Workload, c: Candidate, topo: Topology, device: Device):
        self.w, self.c, self.topo, self.device = w, c, topo, device
        self.bytes = w.act_bytes
        self.q = c.micro_batch * w.seq_len / c.cp  # tokens a tp group computes on
        self.t = self.q / c.tp  # tokens this rank holds
        self.forwards = 2 if c.recompute else 1  # recompute replays the forward
        self.passes = self.forwards + 2  # each GEMM: forward(s) and two backward GEMMs

    def gemms(self, shapes: list[tuple[float, float, float]]) -> float:
        return self.passes * sum(gemm_time(m, n, k, self.device) for m, n, k in shapes)

    def finish(self, cost: LayerCost, ops: float) -> LayerCost:
        """Add memory-bound elementwise work and per-op overhead to `cost`."""
        elementwise = ELEMENTWISE_PASSES * cost.activations / self.device.memory_bandwidth
        cost.compute += elementwise + ops * self.device.op_overhead
        return cost

    def ring(self, cost: LayerCost, family: str, nbytes: float, calls: int) -> None:
        """`calls` ring collectives (all-gather or reduce-scatter) of `nbytes` gathered each."""
        span = getattr(self.topo, family)
        sent = nbytes * (span.size - 1) / span.size * calls
        cost.sent[family] += sent
        cost.comm[family] += collective_time(sent, span, self.device, calls)

    def tp_region(self, cost: LayerCost) -> None:
        """Sequence parallelism: all-gather in, reduce-scatter out; mirrored in the backward."""
        self.ring(cost, "tp", self.bytes * self.q * self.w.model.hidden, 2 * (self.forwards + 1))


def _attention(x: _Layer) -> LayerCost:
    m, c = x.w.model, x.c
    hd = m.resolved_head_dim
    cost = LayerCost()
    # per sequence and head: S/cp queries against all S keys (k and v are gathered over cp)
    sequences = c.micro_batch * m.heads / c.tp
    cost.attention_core = x.passes * sequences * gemm_time(x.w.seq_len / c.cp, x.w.seq_len, hd,
                                                           x.device)
    qkv = (x.q, (m.heads + 2 * m.kv_heads) * hd / c.tp, m.hidden)
    cost.compute = cost.attention_core + x.gemms([qkv, (x.q, m.hidden, m.heads * hd / c.tp)])
    # norm input, qkv input (sequence-sharded), q/k/v, attention output
    cost.activations = x.bytes * x.t * (2 * m.hidden + (2 * m.heads + 2 * m.kv_heads) * hd)
    x.tp_region(cost)
    # context parallel: all-gather k and v over cp, reduce-scatter their gradients
    x.ring(cost, "cp", x.bytes * x.q * c.cp * m.kv_heads * hd / c.tp, 2 * (x.forwards + 1))
    return x.finish(cost, OPS_ATTENTION)


def _mlp(x: _Layer, ffn: int, ops: int) -> LayerCost:
    """A tp-sharded SwiGLU MLP (the dense MLP or the shared expert) with its norm input."""
    hidden, tp = x.w.model.hidden, x.c.tp
    cost = LayerCost(activations=x.bytes * x.t * hidden)  # the norm's input
    if ffn:
        cost.compute = x.gemms([(x.q, 2 * ffn / tp, hidden), (x.q, hidden, ffn / tp)])
        cost.activations += x.bytes * (x.t * hidden + x.q * 3 * ffn / tp)
        x.tp_region(cost)
    return x.finish(cost, ops)


def _routed(x: _Layer) -> LayerCost:
    """Router, dispatch over ep (+ gather over etp), the local experts, combine."""
    m, moe, c = x.w.model, x.w.moe, x.c
    local_experts = moe.num_experts // c.ep
    rows = x.t * moe.topk * x.w.expert_load  # rows this rank sends, and receives on average
    rows_per_expert = rows * c.etp / local_experts
    width = moe.ffn_hidden / c.etp
    cost = LayerCost()
    experts = [(rows_per_expert, 2 * width, m.hidden), (rows_per_expert, m.hidden, width)]
    cost.compute = x.gemms([(x.t, moe.num_experts, m.hidden)]) + local_experts * x.gemms(experts)
    # router input, expert inputs (after the etp gather), gate/up, activation, outputs
    cost.activations = x.bytes * (x.t * m.hidden + rows * c.etp * (2 * m.hidden + 3 * width))
    calls = 2 * (x.forwards + 1)  # dispatch and combine: forward(s) and backward
    ep_span = x.topo.ep
    ep_sent = x.bytes * rows * m.hidden * (ep_span.size - 1) / ep_span.size * calls
    cost.sent["ep"] = ep_sent
    # each exchange is preceded by a count exchange: two calls' latency
    cost.comm["ep"] = collective_time(ep_sent, ep_span, x.device, 2 * calls, all_to_all=True)
    x.ring(cost, "etp", x.bytes * rows * c.etp * m.hidden, calls)
    ops = OPS_MOE + (OPS_DISPATCH if c.ep * c.etp > 1 else 0)
    if not x.device.overlap:  # CPU: moefold loops over local experts; GPUs use a grouped GEMM
        ops += OPS_PER_LOCAL_EXPERT * local_experts
    return x.finish(cost, ops)


def layer_costs(w: Workload, c: Candidate, topo: Topology,
                device: Device) -> tuple[LayerCost, LayerCost]:
    """(dense layer, MoE layer) per micro-batch; each includes its attention block."""
    x = _Layer(w, c, topo, device)
    attention = _attention(x)
    dense = attention.add(_mlp(x, w.model.ffn_hidden, OPS_DENSE_MLP))
    if not w.moe.enabled:
        return dense, dense
    moe = attention.add(_mlp(x, w.moe.shared_ffn_hidden, 0)).add(_routed(x))
    return dense, moe


def head_cost(w: Workload, c: Candidate, topo: Topology, device: Device) -> LayerCost:
    """Final norm, vocab-parallel LM head and the loss, on the last pipeline stage."""
    x = _Layer(w, c, topo, device)
    cost = LayerCost()
    cost.compute = 3 * gemm_time(x.q, w.model.vocab_size / c.tp, w.model.hidden, device)
    cost.activations = x.bytes * x.t * w.model.hidden + _logits_bytes(w, c)
    x.tp_region(cost)
    return x.finish(cost, 20)


def _logits_bytes(w: Workload, c: Candidate) -> float:
    """Logits of one micro-batch, their fp32 copy for the loss and its gradient."""
    tokens = c.micro_batch * w.seq_len / c.cp
    return tokens * w.model.vocab_size / c.tp * (w.act_bytes + 8)


# ---- what each pipeline rank holds -------------------------------------------------------------


@lru_cache(maxsize=4096)
def rank_layers(num_layers: int, pp: int, vpp: int, moe_flags: tuple[bool, ...]) -> tuple:
    """((dense layers, MoE layers) of each pp rank); rank r holds virtual stages r, r+pp, ..."""
    per_chunk = num_layers // (pp * vpp)
    counts = []
    for rank in range(pp):
        layers = [
            index
            for chunk in range(vpp)
            for index in range((chunk * pp + rank) * per_chunk, (chunk * pp + rank + 1) * per_chunk)
        ]
        num_moe = sum(moe_flags[i] for i in layers)
        counts.append((len(layers) - num_moe, num_moe))
    return tuple(counts)


@dataclass(frozen=True)
class LocalParams:
    """Parameters one rank holds, by gradient family."""

    dense: float  # reduced over dp x cp
    expert: float  # reduced over edp


def local_params(w: Workload, c: Candidate, num_dense: int, num_moe: int, first: bool,
                 last: bool) -> LocalParams:
    """Parameters of a rank with these layers; vocab-parallel embedding and head (Megatron)."""
    m, moe = w.model, w.moe
    hd = m.resolved_head_dim
    attention = (m.hidden * (m.heads + 2 * m.kv_heads) * hd + m.heads * hd * m.hidden) / c.tp
    if m.attn_bias:
        attention += (m.heads + 2 * m.kv_heads) * hd / c.tp
    norms = 2 * m.hidden + (2 * hd if m.qk_norm else 0)
    dense_layer = attention + norms + 3 * m.hidden * m.ffn_hidden / c.tp
    moe_dense = attention + norms + moe.num_experts * m.hidden
    moe_dense += 3 * m.hidden * moe.shared_ffn_hidden / c.tp + (m.hidden if moe.shared_gate else 0)
    experts = moe.num_experts / c.ep * 3 * m.hidden * moe.ffn_hidden / c.etp
    dense = num_dense * dense_layer + num_moe * moe_dense
    tables = m.vocab_size * m.hidden / c.tp
    dense += (tables if first else 0) + (tables + m.hidden if last and not m.tie_embeddings else 0)
    return LocalParams(dense=dense, expert=num_moe * experts)


def in_flight(c: Candidate, rank: int, num_microbatches: int) -> float:
    """Micro-batches whose activations rank `rank` holds at its peak (1F1B / interleaved)."""
    if c.pp == 1:
        return 1.0
    if c.vpp == 1:
        return float(min(num_microbatches, c.pp - rank))
    chunks = (c.pp - rank - 1) * 2 + (c.vpp - 1) * c.pp + 1  # Megatron's warm-up + 1
    return min(num_microbatches * c.vpp, chunks) / c.vpp


# ---- the step ----------------------------------------------------------------------------------

OPTIMIZER_BYTES = 32  # bytes read + written per parameter of the optimizer shard (Adam)


def _layer_key(c: Candidate) -> Candidate:
    """`c` with the fields per-layer costs do not depend on normalised (a cache key)."""
    return Candidate(tp=c.tp, cp=c.cp, pp=1, vpp=1, dp=1, ep=c.ep, etp=c.etp, edp=1,
                     micro_batch=c.micro_batch, recompute=c.recompute,
                     distributed_optimizer=False, folded=c.folded)


@lru_cache(maxsize=64)
def _moe_flags(w: Workload) -> tuple[bool, ...]:
    return tuple(w.moe.is_moe_layer(i) for i in range(w.model.layers))


def _param_bytes(w: Workload) -> tuple[int, int, int]:
    """(weight, gradient, optimizer-state) bytes per parameter before sharding."""
    return (2, 4, 12) if w.dtype == "bf16" else (4, 4, 8)


@dataclass(frozen=True)
class RankCost:
    """One pipeline rank, one micro-batch: its layers' costs and what of them is exposed."""

    cost: LayerCost
    exposed: dict[str, float]  # family -> seconds on the critical path
    time: float  # compute + exposed communication
    params: LocalParams
    largest_layer: float  # activation bytes of its largest layer (backward workspace)
    num_layers: int


@lru_cache(maxsize=65536)
def rank_cost(w: Workload, key: Candidate, topo: Topology, device: Device, pp: int, vpp: int,
              rank: int) -> RankCost:
    """Per-micro-batch cost of pipeline rank `rank` (`key` from _layer_key)."""
    dense, moe = layer_costs(w, key, topo, device)
    num_dense, num_moe = rank_layers(w.model.layers, pp, vpp, _moe_flags(w))[rank]
    cost = LayerCost()
    for layer, count in ((dense, num_dense), (moe, num_moe)):
        if count:
            cost = cost.add(layer.scaled(count))
    last = rank == pp - 1
    if last:
        cost = cost.add(head_cost(w, key, topo, device))
    exposed = dict(cost.comm)
    if device.overlap:
        exposed["tp"] *= 1 - TP_OVERLAP
        exposed["cp"] = max(0.0, cost.comm["cp"] - cost.attention_core)
    if pp > 1:  # each virtual stage sends its output on and receives a gradient back
        p2p = 2 * vpp * w.act_bytes * key.micro_batch * w.seq_len / (key.cp * key.tp)
        p2p *= w.model.hidden
        cost.sent["pp"] = p2p
        span = GroupSpan(2, topo.pp.nodes, topo.pp.off_node)
        cost.comm["pp"] = collective_time(p2p, span, device, 2 * vpp)
        # interleaved schedules overlap a chunk's transfers with the next chunk's compute
        exposed["pp"] = 0.0 if device.overlap and vpp > 1 else cost.comm["pp"]
    time = cost.compute + sum(exposed[f] for f in ("tp", "cp", "ep", "etp", "pp"))
    params = local_params(w, key, num_dense, num_moe, rank == 0, last)
    largest = max(dense.activations if num_dense else 0.0, moe.activations if num_moe else 0.0)
    return RankCost(cost, exposed, time, params, largest, num_dense + num_moe)


def memory(w: Workload, c: Candidate, device: Device, rank: int, rc: RankCost) -> dict:
    """Bytes one rank holds at its peak, by kind; 'total' is their sum."""
    weight, grad, state = _param_bytes(w)
    dense_shard = c.dp * c.cp if c.distributed_optimizer else 1
    expert_shard = c.edp if c.distributed_optimizer else 1
    held = in_flight(c, rank, w.global_batch // (c.dp * c.micro_batch))
    tokens = c.micro_batch * w.seq_len / (c.cp * c.tp)
    if c.recompute:  # keep each layer's input; the replayed layer is the extra workspace
        logits = _logits_bytes(w, c) if rank == c.pp - 1 else 0.0
        inputs = rc.num_layers * w.act_bytes * tokens * w.model.hidden
        activations = held * (inputs + logits) + 2 * rc.largest_layer
    else:
        activations = held * rc.cost.activations + rc.largest_layer
    rows = tokens * w.moe.topk * w.expert_load
    params = rc.params.dense + rc.params.expert
    out = {
        "weights": weight * params,
        "gradients": grad * params,
        "optimizer": state * (rc.params.dense / dense_shard + rc.params.expert / expert_shard),
        "activations": activations,
        "dispatcher": 2 * rows * w.model.hidden * w.act_bytes if w.moe.enabled else 0.0,
        "runtime": device.runtime_memory_bytes,
    }
    out["total"] = sum(out.values())
    return out


def data_parallel(w: Workload, c: Candidate, topo: Topology, device: Device,
                  rc: RankCost) -> tuple[dict[str, float], dict[str, float]]:
    """Exposed seconds and bytes sent per step of the dense (dp) and expert (edp) gradients."""
    weight, grad, _ = _param_bytes(w)
    reduce_time, gather_time, sent = {}, {}, {}
    for family, count in (("dp", rc.params.dense), ("edp", rc.params.expert)):
        span = getattr(topo, family)
        share = (span.size - 1) / span.size
        if c.distributed_optimizer:  # reduce-scatter grads, all-gather the updated weights
            grads, weights = share * count * grad, share * count * weight
        else:  # all-reduce grads
            grads, weights = 2 * share * count * grad, 0.0
        reduce_time[family] = collective_time(grads, span, device, 1)
        gather_time[family] = collective_time(weights, span, device, 1)
        sent[family] = grads + weights
    exposed = {f: reduce_time[f] + gather_time[f] for f in ("dp", "edp")}
    if device.overlap:  # behind the last micro-batch's backward and the first one's forward
        hidden = min(sum(reduce_time.values()), rc.cost.compute * 2 / 3)
        hidden += min(sum(gather_time.values()), rc.cost.compute / 3)
        total = sum(exposed.values()) or 1.0
        exposed = {f: exposed[f] * (1 - hidden / total) for f in exposed}
    return exposed, sent


@lru_cache(maxsize=4096)
def ranks_to_check(w: Workload, pp: int, vpp: int) -> tuple[int, ...]:
    """The first rank (most activations, the embedding), the last (the head) and one rank of
    every other mix of dense and MoE layers."""
    counts = rank_layers(w.model.layers, pp, vpp, _moe_flags(w))
    chosen, seen = {0, pp - 1}, {counts[0], counts[-1]}
    for rank, mix in enumerate(counts):
        if mix not in seen:
            seen.add(mix)
            chosen.add(rank)
    return tuple(sorted(chosen))


def estimate(w: Workload, c: Candidate, topo: Topology, device: Device) -> Estimate:
    """Predicted step time and its split, memory per rank, tokens/s and MFU of `c`."""
    key = _layer_key(c)
    m = w.global_batch // (c.dp * c.micro_batch)  # micro-batches per pipeline
    slowest, fullest_memory = None, None
    for rank in ranks_to_check(w, c.pp, c.vpp):
        rc = rank_cost(w, key, topo, device, c.pp, c.vpp, rank)
        mem = memory(w, c, device, rank, rc)
        if slowest is None or rc.time > slowest.time:
            slowest = rc
        if fullest_memory is None or mem["total"] > fullest_memory["total"]:
            fullest_memory = mem
    assert slowest is not None and fullest_memory is not None
    dp_exposed, dp_sent = data_parallel(w, c, topo, device, slowest)
    time = {"compute": m * slowest.cost.compute}
    time.update({f: m * slowest.exposed[f] for f in ("tp", "cp", "ep", "etp", "pp")})
    time.update(dp_exposed)
    time["bubble"] = (c.pp - 1) / c.vpp * slowest.time
    shard = slowest.params.dense / (c.dp * c.cp if c.distributed_optimizer else 1)
    shard += slowest.params.expert / (c.edp if c.distributed_optimizer else 1)
    time["optimizer"] = shard * OPTIMIZER_BYTES / device.memory_bandwidth
    step = sum(time.values())
    time["total"] = step
    sent = {f: m * slowest.cost.sent[f] for f in ("tp", "cp", "ep", "etp", "pp")}
    sent.update(dp_sent)
    tokens = w.global_batch * w.seq_len
    world = c.dp * c.cp * c.tp * c.pp
    flops = flops_per_token(w.model, w.moe, w.seq_len) * tokens
    return Estimate(
        candidate=c, time=time, memory=fullest_memory, comm_bytes=sent, step_time=step,
        tokens_per_s=tokens / step, mfu=flops / step / (world * device.peak_flops),
        fits=fullest_memory["total"] <= device.memory_bytes,
    )
