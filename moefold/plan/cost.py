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
from typing import NamedTuple

from moefold.config import ModelConfig, MoEConfig
from moefold.dispatch.routing import expected_destination_ranks
from moefold.kernels.gemm import cpu_bf16_gemm_is_native
from moefold.model.experts import cpu_runs_grouped_mm
from moefold.model.size import flops_per_token
from moefold.plan.hardware import Device
from moefold.plan.memory import (
    MOEFOLD_TP_REPLICATED,
    LocalParams,
    local_params,
    logits_bytes,
    memory_breakdown,
    param_bytes,
    rank_layers,
)

# ---- global constants (docs/planner.md, "Constants") -----------------------------------------
TP_OVERLAP = 0.50  # share of tp all-gather / reduce-scatter hidden behind GEMMs (overlap runtimes)
DROPLESS_IMBALANCE = 1.15  # busiest rank's routed rows / mean, dropless with a balancing loss
# aten ops per layer, forward + backward, counted in moefold on CPU (docs/planner.md)
OPS_ATTENTION, OPS_DENSE_MLP, OPS_MOE, OPS_PER_LOCAL_EXPERT, OPS_DISPATCH = 147, 74, 149, 28, 40
OPS_HEAD = 20
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


class GroupSpan(NamedTuple):
    """How one family's groups sit on nodes (worst group of the family); a tuple, so cache
    keys built from it hash fast."""

    size: int
    nodes: int  # nodes the group spans
    off_node: float  # fraction of a member's peers on other nodes
    per_node: int = 1  # fewest members the group has on one of its nodes


@dataclass(frozen=True, kw_only=True, eq=False)
class Topology:
    """Node placement of every communicating family of one layout (see search.topology).

    Compared and hashed by identity: search.topology returns one object per layout, and the
    cost model's caches key on it cheaply."""

    tp: GroupSpan
    cp: GroupSpan
    dp: GroupSpan  # dense gradients: dp x cp
    dp_tp: GroupSpan  # gradients of weights whole on every tp rank (moefold): dp x cp x tp
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
    grad_compression: str = "none"  # "bytegrad": 8-bit dp/edp gradient reduction
    # parts kept whole on every tp rank (memory.py TP_PARTS); empty = Megatron-Core's layout,
    # which the paper calibration assumes; moefold's own is memory.MOEFOLD_TP_REPLICATED
    tp_replicated: frozenset[str] = frozenset()
    # fp32 norms and router saving fp32 copies for backward (moefold's RMSNorm keeps its input
    # and its normalised output in fp32, its router the fp32 input): 8 bytes per element per
    # norm, 4 for the router input, where Megatron's fused norm keeps the bf16 input
    fp32_norm_copies: bool = False
    # [tokens, F] tensors a SwiGLU keeps for backward: 3 with Megatron's fused activation (fc1
    # output and the activation), 4 through autograd (moefold: gate, up, silu(gate), product)
    swiglu_saves: int = 3

    def norm_extra_bytes(self) -> float:
        """Bytes per token and hidden unit a norm saves beyond the input counted for it."""
        return 8.0 - self.act_bytes if self.fp32_norm_copies else 0.0

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


def moefold_workload(
    model: ModelConfig,
    moe: MoEConfig,
    seq_len: int,
    global_batch: int,
    dtype: str,
    grad_compression: str,
) -> Workload:
    """The workload as moefold builds it (not Megatron-Core's layout, Workload's defaults):
    tables and shared expert whole on every tp rank, fp32 copies kept by norms and router,
    four saved SwiGLU tensors. `moefold plan` and the dry run's planner column both use it."""
    return Workload(
        model=model,
        moe=moe,
        seq_len=seq_len,
        global_batch=global_batch,
        dtype=dtype,
        grad_compression=grad_compression,
        tp_replicated=MOEFOLD_TP_REPLICATED,
        fp32_norm_copies=True,
        swiglu_saves=4,
    )


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


def attention_time(flops: float, block: float, device: Device) -> float:
    """Seconds of fused causal attention: the device's attention rate (a fraction of its peak),
    and like a GEMM slower on short blocks (the query and the key block dimension count)."""
    share = block / (block + device.gemm_half_dim)
    return flops / (device.peak_flops * device.attention_efficiency * share * share)


def collective_time(
    nbytes: float, span: GroupSpan, device: Device, calls: float, all_to_all: bool = False
) -> float:
    """Seconds for this rank to send `nbytes` over the groups of `span` in `calls` collectives.

    Ring collectives inside a node run at NVLink speed. Across nodes, the k members a group has
    on a node drive k network ports in parallel rings (NCCL's channels), so a ring gets
    min(NVLink, k x port) bandwidth. An all-to-all sends its off-node share through the rank's
    own port and the rest over NVLink at the same time. Each call also pays a latency per peer
    step (ring: n - 1 steps; all-to-all: the n - 1 pairwise sends are issued together).
    """
    if span.size == 1 or nbytes <= 0:
        return 0.0
    crosses = span.nodes > 1
    step_latency = device.inter_node_latency if crosses else device.intra_node_latency
    if all_to_all:
        eff = device.all_to_all_efficiency
        inside = nbytes * (1 - span.off_node) / (device.intra_node_bandwidth * eff)
        outside = nbytes * span.off_node / (device.inter_node_bandwidth * eff)
        steps = 1 if device.overlap else span.size - 1  # gloo sends pairwise, one at a time
        return max(inside, outside) + calls * steps * step_latency
    bandwidth = device.intra_node_bandwidth
    if crosses:
        bandwidth = min(bandwidth, span.per_node * device.inter_node_bandwidth)
    return (
        nbytes / (bandwidth * device.collective_efficiency) + calls * (span.size - 1) * step_latency
    )


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
        out = LayerCost(
            compute=self.compute * factor,
            attention_core=self.attention_core * factor,
            activations=self.activations * factor,
        )
        out.comm = {f: v * factor for f, v in self.comm.items()}
        out.sent = {f: v * factor for f, v in self.sent.items()}
        return out

    def with_pp(self, sent: float, seconds: float) -> LayerCost:
        """A copy with the pipeline transfers set (the layer sums are shared across vpp)."""
        out = LayerCost(
            compute=self.compute,
            attention_core=self.attention_core,
            comm={**self.comm, "pp": seconds},
            sent={**self.sent, "pp": sent},
            activations=self.activations,
        )
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
        """Add memory-bound elementwise work and per-op overhead to `cost` (a replayed forward
        redoes its share: one pass and a third of the ops)."""
        replay = (self.passes) / 3
        passes = self.device.elementwise_passes + self.forwards - 1
        elementwise = passes * cost.activations / self.device.memory_bandwidth
        cost.compute += elementwise + replay * ops * self.device.op_overhead
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


def _mla(x: _Layer) -> LayerCost:
    """MLA (model/mla.py): down projections replicated over tp, the rest split by heads; cp
    gathers the expanded per-head keys and values."""
    m, c = x.w.model, x.c
    qk, heads = m.qk_nope_head_dim + m.qk_rope_head_dim, m.heads / c.tp
    cost = LayerCost()
    flops = x.passes * x.q * x.w.seq_len * heads * (qk + m.v_head_dim)  # size.py, per tp rank
    block = x.w.seq_len / (2 * c.cp) if c.cp > 1 else x.w.seq_len
    cost.attention_core = attention_time(flops, block, x.device)
    rq, rkv = m.q_lora_rank, m.kv_lora_rank
    gemms = [
        (x.q, rq + rkv + m.qk_rope_head_dim, m.hidden),
        (x.q, heads * qk, rq or m.hidden),
        (x.q, heads * (m.qk_nope_head_dim + m.v_head_dim), rkv),
        (x.q, m.hidden, heads * m.v_head_dim),
    ]
    cost.compute = cost.attention_core + x.gemms(gemms)
    # norm input, latents, q, k, v, attention output (per token)
    per_token = 2 * m.hidden + rq + rkv + m.heads * (2 * qk + 2 * m.v_head_dim)
    cost.activations = x.bytes * x.t * per_token
    cost.activations += x.w.norm_extra_bytes() * x.t * m.hidden
    x.tp_region(cost)
    x.ring(cost, "cp", x.bytes * x.q * c.cp * heads * (qk + m.v_head_dim), 2 * (x.forwards + 1))
    return x.finish(cost, OPS_ATTENTION)


def _attention(x: _Layer) -> LayerCost:
    m, c = x.w.model, x.c
    if m.mla:
        return _mla(x)
    hd = m.resolved_head_dim
    cost = LayerCost()
    # causal scores and values, 2*S*H*hd FLOPs per token (size.py), in blocks of S/(2 cp) rows
    # under cp (the load-balanced causal split), of S rows otherwise
    flops = x.passes * x.q * 2 * x.w.seq_len * m.heads * hd / c.tp
    block = x.w.seq_len / (2 * c.cp) if c.cp > 1 else x.w.seq_len
    cost.attention_core = attention_time(flops, block, x.device)
    qkv = (x.q, (m.heads + 2 * m.kv_heads) * hd / c.tp, m.hidden)
    cost.compute = cost.attention_core + x.gemms([qkv, (x.q, m.hidden, m.heads * hd / c.tp)])
    # norm input, qkv input (sequence-sharded), q/k/v, attention output
    cost.activations = x.bytes * x.t * (2 * m.hidden + (2 * m.heads + 2 * m.kv_heads) * hd)
    cost.activations += x.w.norm_extra_bytes() * x.t * m.hidden
    x.tp_region(cost)
    # context parallel: all-gather k and v over cp, reduce-scatter their gradients
    x.ring(cost, "cp", x.bytes * x.q * c.cp * m.kv_heads * hd / c.tp, 2 * (x.forwards + 1))
    return x.finish(cost, OPS_ATTENTION)


def _mlp(x: _Layer, ffn: int, ops: int, whole: bool = False) -> LayerCost:
    """A SwiGLU MLP (the dense MLP or the shared expert) with its norm input: tp-sharded
    behind a sequence-parallel gather, or `whole` on every tp rank over its own tokens (the
    same FLOPs and saved bytes, no tp traffic: moefold's shared expert)."""
    hidden, tp = x.w.model.hidden, x.c.tp
    cost = LayerCost(activations=x.bytes * x.t * hidden)  # the norm's input
    cost.activations += x.w.norm_extra_bytes() * x.t * hidden
    if ffn:
        cost.compute = x.gemms([(x.q, 2 * ffn / tp, hidden), (x.q, hidden, ffn / tp)])
        cost.activations += x.bytes * (x.t * hidden + x.q * x.w.swiglu_saves * ffn / tp)
        if not whole:
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
    cost.compute = x.gemms([(x.t, moe.num_experts, m.hidden)])
    if x.device.grouped_gemm:  # one grouped GEMM tiles all local experts' rows together
        cost.compute += x.gemms(
            [(rows * c.etp, 2 * width, m.hidden), (rows * c.etp, m.hidden, width)]
        )
    else:  # a loop over the local experts, one GEMM each (moefold on CPU)
        experts = [(rows_per_expert, 2 * width, m.hidden), (rows_per_expert, m.hidden, width)]
        cost.compute += local_experts * x.gemms(experts)
    # router input, expert inputs (after the etp gather), gate/up, activation, outputs
    saved = 2 * m.hidden + x.w.swiglu_saves * width
    cost.activations = x.bytes * (x.t * m.hidden + rows * c.etp * saved)
    if x.w.fp32_norm_copies:  # the router's fp32 copy of its input
        cost.activations += 4 * x.t * m.hidden
    calls = 2 * (x.forwards + 1)  # dispatch and combine: forward(s) and backward
    # a rank sends its own rows (the mean); the exchange lasts as long as the busiest receiver
    sent_per_token = moe.topk
    if moe.dedup:  # one row per destination rank, fewer under node-limited routing
        sent_per_token = expected_destination_ranks(
            moe.num_experts, moe.topk, moe.num_groups, moe.group_topk, c.ep
        )
    kept = x.t * sent_per_token * min(1.0, moe.capacity_factor or 1.0)
    ep_span = x.topo.ep
    row_bytes = x.bytes * m.hidden * (ep_span.size - 1) / ep_span.size * calls
    cost.sent["ep"] = kept * row_bytes
    # each exchange is preceded by a count exchange: two calls' latency
    cost.comm["ep"] = collective_time(
        rows * sent_per_token / moe.topk * row_bytes, ep_span, x.device, 2 * calls, all_to_all=True
    )
    x.ring(cost, "etp", x.bytes * rows * c.etp * m.hidden, calls)
    cost.sent["etp"] *= kept / rows
    ops = OPS_MOE + (OPS_DISPATCH if c.ep * c.etp > 1 else 0)
    # moefold's CPU loop over experts runs in Python, except for small experts and native bf16
    # products, which torch's grouped_mm loops over in C++ (the same per-expert GEMMs, without
    # the per-expert ops).
    if not x.device.grouped_gemm:
        native_bf16 = x.w.dtype == "bf16" and cpu_bf16_gemm_is_native(m.hidden)
        if not cpu_runs_grouped_mm(m.hidden, int(width), native_bf16):
            ops += OPS_PER_LOCAL_EXPERT * local_experts
    return x.finish(cost, ops)


def layer_costs(
    w: Workload, c: Candidate, topo: Topology, device: Device
) -> tuple[LayerCost, LayerCost]:
    """(dense layer, MoE layer) per micro-batch; each includes its attention block."""
    x = _Layer(w, c, topo, device)
    attention = _attention(x)
    dense = attention.add(_mlp(x, w.model.ffn_hidden, OPS_DENSE_MLP))
    if not w.moe.enabled:
        return dense, dense
    shared_ops = OPS_DENSE_MLP if w.moe.shared_ffn_hidden else 0
    whole = "shared_expert" in w.tp_replicated
    moe = attention.add(_mlp(x, w.moe.shared_ffn_hidden, shared_ops, whole)).add(_routed(x))
    return dense, moe


def head_cost(w: Workload, c: Candidate, topo: Topology, device: Device) -> LayerCost:
    """Final norm, LM head and the loss, on the last pipeline stage: vocab-parallel behind a
    sequence-parallel gather (Megatron), or whole on every tp rank over its own tokens
    (moefold, "tables" in `tp_replicated`: the same FLOPs, no tp traffic)."""
    x = _Layer(w, c, topo, device)
    cost = LayerCost()
    cost.compute = 3 * gemm_time(x.q, w.model.vocab_size / c.tp, w.model.hidden, device)
    cost.activations = x.bytes * x.t * w.model.hidden + logits_bytes(w, c)
    if "tables" not in w.tp_replicated:
        x.tp_region(cost)
    return x.finish(cost, OPS_HEAD)


# ---- the step ----------------------------------------------------------------------------------

OPTIMIZER_BYTES = 32  # bytes read + written per parameter of the optimizer shard (Adam)
# ByteGrad: memory traffic per gradient element of its quantise / dequantise passes (read for
# min/max 4, quantise 4 + 1, dequantise and sum the received copies 1 + 4, dequantise the
# gathered sums 1 + 4); ZeRO-1 skips the last pass.
BYTEGRAD_PASS_BYTES, BYTEGRAD_PASS_BYTES_ZERO1 = 19, 14


@dataclass(frozen=True)
class RankCost:
    """One pipeline rank, one micro-batch: its layers' costs and what of them is exposed."""

    cost: LayerCost
    exposed: dict[str, float]  # family -> seconds on the critical path
    time: float  # compute + exposed communication
    params: LocalParams
    largest_layer: float  # activation bytes of its largest layer (backward workspace)
    num_layers: int


class CostModel:
    """Estimates candidates of one workload on one device, caching per-layer and per-rank costs
    (they do not depend on dp, the optimizer or, for layers, on vpp)."""

    def __init__(self, workload: Workload, device: Device) -> None:
        self.w, self.device = workload, device
        self.moe_flags = tuple(workload.moe.is_moe_layer(i) for i in range(workload.model.layers))
        tokens = workload.global_batch * workload.seq_len
        self.tokens_per_step = tokens
        self.flops_per_step = flops_per_token(workload.model, workload.moe, workload.seq_len)
        self.flops_per_step *= tokens
        self._layers: dict = {}
        self._ranks: dict = {}
        self._sums: dict = {}
        self._checked: dict = {}
        self._counts: dict = {}
        self._param_cache: dict = {}

    @staticmethod
    def _layer_key(c: Candidate, topo: Topology) -> tuple:
        """What per-layer costs depend on: degrees, micro-batch, recompute, and the placement
        of the families a layer talks on."""
        return (
            c.tp,
            c.cp,
            c.ep,
            c.etp,
            c.micro_batch,
            c.recompute,
            topo.tp,
            topo.cp,
            topo.ep,
            topo.etp,
        )

    def layers(self, c: Candidate, topo: Topology) -> tuple[LayerCost, LayerCost, LayerCost]:
        """(dense layer, MoE layer, head) per micro-batch."""
        key = self._layer_key(c, topo)
        if key not in self._layers:
            self._layers[key] = (
                *layer_costs(self.w, c, topo, self.device),
                head_cost(self.w, c, topo, self.device),
            )
        return self._layers[key]

    def rank_layers(self, pp: int, vpp: int) -> tuple:
        """(dense, MoE) layer counts of each pipeline rank; the multi-token prediction depths'
        blocks (model/mtp.py: layers L..L+D-1 by kind) count on the last rank, where they run."""
        if (pp, vpp) not in self._counts:
            counts = list(rank_layers(self.w.model.layers, pp, vpp, self.moe_flags))
            m, moe = self.w.model, self.w.moe
            mtp_moe = sum(moe.is_moe_layer(m.layers + k) for k in range(m.mtp_depths))
            dense, routed = counts[-1]
            counts[-1] = (dense + m.mtp_depths - mtp_moe, routed + mtp_moe)
            self._counts[(pp, vpp)] = tuple(counts)
        return self._counts[(pp, vpp)]

    def rank(self, c: Candidate, topo: Topology, rank: int) -> RankCost:
        """Per-micro-batch cost of pipeline rank `rank`."""
        key = (self._layer_key(c, topo), c.pp, c.vpp, rank, topo.pp)
        if key not in self._ranks:
            self._ranks[key] = self._rank(c, topo, rank)
        return self._ranks[key]

    def _rank(self, c: Candidate, topo: Topology, rank: int) -> RankCost:
        w, device = self.w, self.device
        dense, moe, _ = self.layers(c, topo)
        num_dense, num_moe = self.rank_layers(c.pp, c.vpp)[rank]
        last = rank == c.pp - 1
        cost, exposed, time = self._sum(c, topo, num_dense, num_moe, last)
        if c.pp > 1:  # each virtual stage sends its output on and its input gradient back
            tokens = c.micro_batch * w.seq_len / (c.cp * c.tp)
            # but the very first stage has no gradient to send and the very last no output
            sends = 2 * c.vpp - (rank == 0) - last
            # with MTP the first stage's embeddings of the D shifted tokens travel alongside
            p2p = sends * w.act_bytes * tokens * w.model.hidden * (1 + w.model.mtp_depths)
            span = GroupSpan(2, topo.pp.nodes, topo.pp.off_node, 1)
            p2p_time = collective_time(p2p, span, device, sends)
            cost = cost.with_pp(p2p, p2p_time)
            # interleaved schedules overlap a chunk's transfers with the next chunk's compute
            exposed = {**exposed, "pp": 0.0 if device.overlap and c.vpp > 1 else p2p_time}
            time += exposed["pp"]
        params = self._params(c, num_dense, num_moe, rank == 0, last)
        largest = max(dense.activations if num_dense else 0.0, moe.activations if num_moe else 0.0)
        return RankCost(cost, exposed, time, params, largest, num_dense + num_moe)

    def _sum(
        self, c: Candidate, topo: Topology, num_dense: int, num_moe: int, last: bool
    ) -> tuple[LayerCost, dict[str, float], float]:
        """Cost of this many dense and MoE layers (and the head when `last`), what of its
        communication is exposed, and its time; cached."""
        key = (self._layer_key(c, topo), num_dense, num_moe, last)
        if key not in self._sums:
            dense, moe, head = self.layers(c, topo)
            cost = LayerCost()
            for layer, count in ((dense, num_dense), (moe, num_moe)):
                if count:
                    cost = cost.add(layer.scaled(count))
            if last:  # the LM head (and loss) once more per multi-token prediction depth
                cost = cost.add(head.scaled(1 + self.w.model.mtp_depths))
            exposed = dict(cost.comm)
            if self.device.overlap:
                exposed["tp"] *= 1 - TP_OVERLAP
                exposed["cp"] = max(0.0, cost.comm["cp"] - cost.attention_core)
            time = cost.compute + sum(exposed[f] for f in ("tp", "cp", "ep", "etp", "pp"))
            self._sums[key] = (cost, exposed, time)
        return self._sums[key]

    def ranks_to_check(self, pp: int, vpp: int) -> tuple[int, ...]:
        """The first rank (most activations, the embedding), the last (the head) and one rank
        of every other mix of dense and MoE layers."""
        if (pp, vpp) not in self._checked:
            counts = self.rank_layers(pp, vpp)
            chosen, seen = {0, pp - 1}, {counts[0], counts[-1]}
            for rank, mix in enumerate(counts):
                if mix not in seen:
                    seen.add(mix)
                    chosen.add(rank)
            self._checked[(pp, vpp)] = tuple(sorted(chosen))
        return self._checked[(pp, vpp)]

    def memory(self, c: Candidate, topo: Topology, rank: int | None = None) -> dict[str, float]:
        """Memory of pipeline rank `rank` (default: the fullest rank), by kind (no time is
        computed)."""
        fullest: dict[str, float] = {}
        ranks = self.ranks_to_check(c.pp, c.vpp) if rank is None else (rank,)
        for r in ranks:
            num_dense, num_moe = self.rank_layers(c.pp, c.vpp)[r]
            last = r == c.pp - 1
            cost = self._sum(c, topo, num_dense, num_moe, last)[0]
            dense, moe, _ = self.layers(c, topo)
            largest = max(
                dense.activations if num_dense else 0.0, moe.activations if num_moe else 0.0
            )
            params = self._params(c, num_dense, num_moe, r == 0, last)
            mem = memory_breakdown(
                self.w, c, self.device, r, params, cost.activations, largest, num_dense + num_moe
            )
            if not fullest or mem["total"] > fullest["total"]:
                fullest = mem
        return fullest

    def _params(
        self, c: Candidate, num_dense: int, num_moe: int, first: bool, last: bool
    ) -> LocalParams:
        key = (c.tp, c.ep, c.etp, num_dense, num_moe, first, last)
        if key not in self._param_cache:
            self._param_cache[key] = local_params(self.w, c, num_dense, num_moe, first, last)
        return self._param_cache[key]

    def fits(self, c: Candidate, topo: Topology) -> bool:
        """Whether `c` fits in the device's memory."""
        return self.memory(c, topo)["total"] <= self.device.memory_bytes

    def data_parallel(
        self, c: Candidate, topo: Topology, rc: RankCost
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Exposed seconds and bytes sent per step of the dense (dp) and expert (edp) grads."""
        weight, grad, _ = param_bytes(self.w.dtype)
        reduce_time = dict.fromkeys(("dp", "edp"), 0.0)
        gather_time, sent, quantise = dict(reduce_time), dict(reduce_time), dict(reduce_time)
        # weights whole on every tp rank reduce over dp x cp x tp (their count is 0 in
        # Megatron's layout); both dense groups are counted under "dp", as CommStats does
        groups = (
            ("dp", topo.dp, rc.params.dense - rc.params.tp_replicated),
            ("dp", topo.dp_tp, rc.params.tp_replicated),
            ("edp", topo.edp, rc.params.expert),
        )
        for family, span, count in groups:
            share = (span.size - 1) / span.size
            weights = share * count * weight if c.distributed_optimizer else 0.0
            if self.w.grad_compression == "bytegrad" and span.size > 1:
                grads, seconds, quantised = self._bytegrad(c, span, count)
                reduce_time[family] += seconds
                quantise[family] += quantised
            elif c.distributed_optimizer:  # reduce-scatter grads, all-gather updated weights
                grads = share * count * grad
                reduce_time[family] += collective_time(grads, span, self.device, 1)
            else:  # all-reduce grads
                grads = 2 * share * count * grad
                reduce_time[family] += collective_time(grads, span, self.device, 1)
            gather_time[family] += collective_time(weights, span, self.device, 1)
            sent[family] += grads + weights
        exposed = {f: reduce_time[f] + gather_time[f] for f in ("dp", "edp")}
        if self.device.overlap:  # behind the last micro-batch's backward, the first's forward
            hidden = min(sum(reduce_time.values()), rc.cost.compute * 2 / 3)
            hidden += min(sum(gather_time.values()), rc.cost.compute / 3)
            total = sum(exposed.values()) or 1.0
            exposed = {f: exposed[f] * (1 - hidden / total) for f in exposed}
        # quantising runs on the compute stream: never hidden behind it
        return {f: exposed[f] + quantise[f] for f in exposed}, sent

    def _bytegrad(self, c: Candidate, span: GroupSpan, count: float) -> tuple[float, ...]:
        """(bytes sent, collective seconds, quantise seconds) of one family's ByteGrad
        reduction of `count` gradients: an all-to-all of 1-byte codes, then (not under
        ZeRO-1, whose parameter all-gather stays full precision) an all-gather of the
        re-quantised sums. The 8-byte min/max per chunk is negligible and left out. The
        all-to-all of equal chunks moves a reduce-scatter's bytes with no count exchange or
        host sync, so it is timed as a ring collective, not with the dispatcher's fitted
        all-to-all efficiency."""
        codes = (span.size - 1) / span.size * count
        seconds = collective_time(codes, span, self.device, 1)
        passes = BYTEGRAD_PASS_BYTES_ZERO1 if c.distributed_optimizer else BYTEGRAD_PASS_BYTES
        if not c.distributed_optimizer:
            seconds += collective_time(codes, span, self.device, 1)
            codes *= 2
        return codes, seconds, count * passes / self.device.memory_bandwidth

    def estimate(
        self, c: Candidate, topo: Topology, *, always: bool = False, memory: dict | None = None
    ) -> Estimate:
        """Predicted step time and its split, memory, tokens/s and MFU of `c` on `topo`.

        The time is left empty for a candidate that does not fit, unless `always`; `memory` is
        its memory() when the caller already has it."""
        ranks = self.ranks_to_check(c.pp, c.vpp)
        memory = memory or self.memory(c, topo)
        fits = memory["total"] <= self.device.memory_bytes
        if not fits and not always:  # what does not fit is never ranked: skip its time
            return Estimate(candidate=c, memory=memory, fits=False)
        slowest = max((self.rank(c, topo, r) for r in ranks), key=lambda rc: rc.time)
        m = self.w.global_batch // (c.dp * c.micro_batch)  # micro-batches per pipeline
        dp_exposed, dp_sent = self.data_parallel(c, topo, slowest)
        time = {"compute": m * slowest.cost.compute}
        time.update({f: m * slowest.exposed[f] for f in ("tp", "cp", "ep", "etp", "pp")})
        time.update(dp_exposed)
        time["bubble"] = (c.pp - 1) / c.vpp * slowest.time
        shard = slowest.params.dense / (c.dp * c.cp if c.distributed_optimizer else 1)
        shard += slowest.params.expert / (c.edp if c.distributed_optimizer else 1)
        time["optimizer"] = shard * OPTIMIZER_BYTES / self.device.memory_bandwidth
        step = sum(time.values())
        time["total"] = step
        sent = {f: m * slowest.cost.sent[f] for f in ("tp", "cp", "ep", "etp", "pp")}
        sent.update(dp_sent)
        world = c.dp * c.cp * c.tp * c.pp
        return Estimate(
            candidate=c,
            time=time,
            memory=memory,
            comm_bytes=sent,
            step_time=step,
            tokens_per_s=self.tokens_per_step / step,
            mfu=self.flops_per_step / step / (world * self.device.peak_flops),
            fits=fits,
        )
