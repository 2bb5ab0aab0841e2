"""Memory of one rank under a candidate layout: parameters, gradients, optimizer state,
activations, dispatcher buffers and the runtime (docs/planner.md, "Memory").

Pure arithmetic on the config; the per-layer activation bytes come from moefold/plan/cost.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from moefold.model.size import mla_split

if TYPE_CHECKING:
    from moefold.plan.cost import Candidate, Workload
    from moefold.plan.hardware import Device

MEMORY_KINDS = ("weights", "gradients", "optimizer", "activations", "dispatcher", "runtime")

# Parts that Megatron-Core shards over tp and a framework may keep whole on every tp rank
# (Workload.tp_replicated): the embedding and LM head tables (Megatron: vocab-parallel) and
# the shared expert (Megatron: column/row parallel like the dense MLP).
TP_PARTS = frozenset({"tables", "shared_expert"})
# moefold (moefold/parallel/tensor_parallel.py): sequence parallel around both, each tp rank
# running them whole on its own tokens. Their gradients join the replicated family, reduced
# and (ZeRO-1) sharded over dp x cp x tp rather than dp x cp.
MOEFOLD_TP_REPLICATED = TP_PARTS


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

    dense: float  # gradients reduced over dp x cp (with tp_replicated: the part below too)
    expert: float  # gradients reduced over edp
    # of `dense`, what a Workload.tp_replicated layout reduces over dp x cp x tp (every weight
    # kept whole on each tp rank: norms, routers, and the TP_PARTS it names); 0 = Megatron
    tp_replicated: float = 0.0


def local_params(
    w: Workload, c: Candidate, num_dense: int, num_moe: int, first: bool, last: bool
) -> LocalParams:
    """Parameters of a rank with these layers. Megatron-Core (empty w.tp_replicated): the
    embedding and head are vocab-parallel over tp and the shared expert is tp-sharded;
    moefold (MOEFOLD_TP_REPLICATED) keeps both whole on every tp rank."""
    m, moe = w.model, w.moe
    tables_tp = 1 if "tables" in w.tp_replicated else c.tp
    shared_tp = 1 if "shared_expert" in w.tp_replicated else c.tp
    hd = m.resolved_head_dim
    attention = (m.hidden * (m.heads + 2 * m.kv_heads) * hd + m.heads * hd * m.hidden) / c.tp
    if m.attn_bias:
        attention += (m.heads + 2 * m.kv_heads) * hd / c.tp
    norms = 2 * m.hidden + (2 * hd if m.qk_norm else 0)
    mla_whole = 0.0
    if m.mla:  # model/mla.py: down projections and latent norms replicated over tp
        replicated, split = mla_split(m)
        attention = replicated + split / c.tp
        norms += m.q_lora_rank + m.kv_lora_rank
        mla_whole = replicated
    dense_layer = attention + norms + 3 * m.hidden * m.ffn_hidden / c.tp
    router = moe.num_experts * m.hidden + (m.hidden if moe.shared_gate else 0)
    shared = 3 * m.hidden * moe.shared_ffn_hidden / shared_tp
    moe_dense = attention + norms + router + shared
    experts = moe.num_experts / c.ep * 3 * m.hidden * moe.ffn_hidden / c.etp
    dense = num_dense * dense_layer + num_moe * moe_dense
    tables = m.vocab_size * m.hidden / tables_tp
    whole_tables = tables if first else 0
    dense += tables if first else 0
    if last:  # final norm, and the LM head unless it is the (first stage's) embedding
        head = 0 if m.tie_embeddings else tables
        dense += m.hidden + head
        # per MTP depth beyond its block (counted as a layer): eh_proj and three norms, whole
        dense += m.mtp_depths * (2 * m.hidden * m.hidden + 3 * m.hidden)
        whole_tables += m.hidden + head
    whole = 0.0
    if w.tp_replicated:  # the replicated gradient family of this layout (docstring)
        whole = (num_dense + num_moe) * (norms + mla_whole)
        whole += num_moe * router
        whole += num_moe * shared if shared_tp == 1 else 0
        whole += whole_tables if tables_tp == 1 else (m.hidden if last else 0)
        whole += m.mtp_depths * (2 * m.hidden * m.hidden + 3 * m.hidden) if last else 0
    return LocalParams(dense=dense, expert=num_moe * experts, tp_replicated=whole)


def in_flight(c: Candidate, rank: int, num_microbatches: int) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak.

    1F1B: rank r has pp - r forwards in flight. Interleaved: Megatron's warm-up of
    2 (pp - r - 1) + (vpp - 1) pp chunks plus the one running, each 1/vpp of the rank's layers.
    """
    if c.pp == 1:
        return 1.0
    if c.vpp == 1:
        return float(min(num_microbatches, c.pp - rank))
    chunks = (c.pp - rank - 1) * 2 + (c.vpp - 1) * c.pp + 1
    return min(num_microbatches * c.vpp, chunks) / c.vpp


def logits_bytes(w: Workload, c: Candidate) -> float:
    """Logits of one micro-batch (vocab-parallel), their fp32 copy for the loss and its grad."""
    tokens = c.micro_batch * w.seq_len / c.cp
    return tokens * w.model.vocab_size / c.tp * (w.act_bytes + 8)


def param_bytes(dtype: str) -> tuple[int, int, int]:
    """(weight, gradient, optimizer state) bytes per parameter before sharding: bf16 weights,
    fp32 main gradients, fp32 master + Adam moments (Megatron); fp32: no master copy."""
    return (2, 4, 12) if dtype == "bf16" else (4, 4, 8)


def memory_breakdown(
    w: Workload,
    c: Candidate,
    device: Device,
    rank: int,
    params: LocalParams,
    activations_per_microbatch: float,
    largest_layer: float,
    num_layers: int,
) -> dict[str, float]:
    """Bytes pipeline rank `rank` holds at its peak, by kind (MEMORY_KINDS) plus 'total'.

    Args:
        activations_per_microbatch: saved activation bytes of all its layers for one micro-batch.
        largest_layer: saved activation bytes of its largest layer (the backward's workspace).
        num_layers: transformer layers the rank holds.
    """
    weight, grad, state = param_bytes(w.dtype)
    dense_shard = c.dp * c.cp if c.distributed_optimizer else 1
    expert_shard = c.edp if c.distributed_optimizer else 1
    held = in_flight(c, rank, w.global_batch // (c.dp * c.micro_batch))
    tokens = c.micro_batch * w.seq_len / (c.cp * c.tp)
    if c.recompute:  # keep each layer's input; the replayed layer is extra workspace
        logits = logits_bytes(w, c) if rank == c.pp - 1 else 0.0
        inputs = num_layers * w.act_bytes * tokens * w.model.hidden
        activations = held * (inputs + logits) + 2 * largest_layer
    else:
        activations = held * activations_per_microbatch + largest_layer
    rows = tokens * w.moe.topk * w.expert_load  # send and receive buffers of the dispatch
    total_params = params.dense + params.expert
    # parameters whose optimizer state this rank keeps: all of them, or its 1/n of each
    # family's reduction group under the distributed optimizer
    replicated_shard = dense_shard * (c.tp if c.distributed_optimizer else 1)
    owned = (
        (params.dense - params.tp_replicated) / dense_shard
        + params.tp_replicated / replicated_shard
        + params.expert / expert_shard
    )
    out = {
        "weights": weight * total_params,
        "gradients": grad * total_params,
        "optimizer": state * owned,
        "activations": activations * (1 + device.allocator_overhead),
        "dispatcher": (2 * rows * w.model.hidden * w.act_bytes if w.moe.enabled else 0.0)
        * (1 + device.allocator_overhead),
        "runtime": device.runtime_memory_bytes,
    }
    out["total"] = sum(out.values())
    return out
