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


@dataclass
class LayerCost:
    """One layer, one micro-batch, one rank: times (s), bytes sent, saved activation bytes."""

    compute: float = 0.0
    attention_core: float = 0.0
    comm: dict[str, float] = field(default_factory=dict)  # family -> seconds (not yet hidden)
    sent: dict[str, float] = field(default_factory=dict)  # family -> bytes
    activations: float = 0.0


def _layer_costs(w: Workload, c: Candidate, spans: dict[str, GroupSpan],
                 device: Device) -> tuple[LayerCost, LayerCost]:
    """(dense layer, MoE layer) costs; both include the attention block."""
    m, moe, bytes_ = w.model, w.moe, w.act_bytes
    hd = m.resolved_head_dim
    q = c.micro_batch * w.seq_len / c.cp
    t = q / c.tp
    passes = 4 if c.recompute else 3  # forward, two backward GEMMs, (replayed forward)
    fwd_passes = 2 if c.recompute else 1

    def gemms(shapes: list[tuple[float, float, float]]) -> float:
        return passes * sum(gemm_time(a, b, k, device) for a, b, k in shapes)

    def ring(family: str, nbytes: float, calls: int) -> tuple[float, float]:
        span = spans[family]
        sent = nbytes * (span.size - 1) / span.size * calls
        return sent, collective_time(sent, span, device, calls)

    attn = LayerCost()
    core = passes * gemm_time(q, w.seq_len, hd, device) * m.heads / c.tp / 2 * 2
    attn.attention_core = core
    attn.compute = core + gemms([(q, (m.heads + 2 * m.kv_heads) * hd / c.tp, m.hidden),
                                 (q, m.hidden, m.heads * hd / c.tp)])
    attn.activations = bytes_ * t * (2 * m.hidden + (2 * m.heads + 2 * m.kv_heads) * hd)
    # tp: all-gather before and reduce-scatter after each tp region, mirrored in backward
    tp_sent, tp_time = ring("tp", bytes_ * q * m.hidden, 2 * (passes - 1 + fwd_passes) // 2 * 2)
    kv = bytes_ * q * 2 * m.kv_heads * hd / c.tp
    cp_sent, cp_time = ring("cp", kv * c.cp, fwd_passes + 1)
    attn.comm = {"tp": tp_time, "cp": cp_time}
    attn.sent = {"tp": tp_sent, "cp": cp_sent}
    attn.compute += _elementwise(attn.activations, device) + OPS_ATTENTION * device.op_overhead

    dense = _with_mlp(attn, c, device, bytes_, q, t, m.hidden, m.ffn_hidden, gemms, tp_time,
                      tp_sent, OPS_DENSE_MLP)
    if not moe.enabled:
        return dense, dense
    routed = _routed(w, c, spans, device, t, gemms, passes, fwd_passes)
    moe_layer = _with_mlp(attn, c, device, bytes_, q, t, m.hidden, moe.shared_ffn_hidden, gemms,
                          tp_time, tp_sent, 0)
    moe_layer.compute += routed.compute
    moe_layer.activations += routed.activations
    for family in ("ep", "etp"):
        moe_layer.comm[family] = routed.comm[family]
        moe_layer.sent[family] = routed.sent[family]
    return dense, moe_layer


def _elementwise(activation_bytes: float, device: Device) -> float:
    return ELEMENTWISE_PASSES * activation_bytes / device.memory_bandwidth


def _with_mlp(attn: LayerCost, c: Candidate, device: Device, bytes_: int, q: float, t: float,
              hidden: int, ffn: int, gemms, tp_time: float, tp_sent: float,
              ops: int) -> LayerCost:
    """The attention block plus a tp-sharded SwiGLU MLP of width `ffn` (0 = none)."""
    out = LayerCost(compute=attn.compute, attention_core=attn.attention_core,
                    comm=dict(attn.comm), sent=dict(attn.sent),
                    activations=attn.activations + bytes_ * t * 2 * hidden)
    out.compute += 2 * hidden * bytes_ * t * ELEMENTWISE_PASSES / device.memory_bandwidth
    if ffn == 0:
        return out
    activations = bytes_ * (t * hidden + q * 3 * ffn / c.tp)
    out.compute += gemms([(q, 2 * ffn / c.tp, hidden), (q, hidden, ffn / c.tp)])
    out.compute += _elementwise(activations, device) + ops * device.op_overhead
    out.activations += activations
    out.comm["tp"] += tp_time
    out.sent["tp"] += tp_sent
    return out


def _routed(w: Workload, c: Candidate, spans: dict[str, GroupSpan], device: Device, t: float,
            gemms, passes: int, fwd_passes: int) -> LayerCost:
    """Router, dispatch, routed experts and combine of one MoE layer."""
    m, moe, bytes_ = w.model, w.moe, w.act_bytes
    local_experts = moe.num_experts // c.ep
    rows = t * moe.topk * w.expert_load  # rows this rank sends (and, on average, receives)
    rows_per_expert = rows * c.etp / local_experts
    width = moe.ffn_hidden / c.etp
    out = LayerCost()
    expert_gemms = [(rows_per_expert, 2 * width, m.hidden), (rows_per_expert, m.hidden, width)]
    out.compute = gemms([(t, moe.num_experts, m.hidden)]) + local_experts * gemms(expert_gemms)
    out.activations = bytes_ * (2 * t * m.hidden + rows * c.etp * (2 * m.hidden + 3 * width))
    grouped = device.gemm_efficiency < 1.0  # GPU runtimes use one grouped GEMM for all experts
    ops = OPS_MOE + (OPS_DISPATCH if c.ep * c.etp > 1 else 0)
    ops += 0 if grouped else OPS_PER_LOCAL_EXPERT * local_experts
    out.compute += _elementwise(out.activations, device) + ops * device.op_overhead
    calls = 2 * (fwd_passes + 1)  # dispatch + combine, forward(s) and backward
    ep_span = spans["ep"]
    ep_sent = bytes_ * rows * m.hidden * (ep_span.size - 1) / ep_span.size * calls
    ep_time = collective_time(ep_sent, ep_span, device, calls * 2, all_to_all=True)
    etp_sent = bytes_ * rows * m.hidden * (c.etp - 1) * calls
    etp_time = collective_time(etp_sent, spans["etp"], device, calls)
    out.comm = {"ep": ep_time, "etp": etp_time}
    out.sent = {"ep": ep_sent, "etp": etp_sent}
    return out
