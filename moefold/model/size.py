"""Parameter counts and training FLOPs of a model, computed from its config alone.

Notation: V vocab, D model dim, L layers, H query heads, KV key/value heads, hd head dim,
F dense FFN hidden, E experts, K top-k, Fe expert FFN hidden, Fs shared-expert FFN hidden,
S sequence length.

Parameters, exactly as moefold/model builds them (vocabulary not padded):
    embedding   V*D input embedding, plus V*D for the LM head unless model.tie_embeddings
    attention   per layer q D*H*hd, k and v D*KV*hd each, o H*hd*D; plus q/k/v biases
                H*hd + 2*KV*hd when model.attn_bias. MLA (model.kv_lora_rank = Rkv > 0,
                model/mla.py): q D*Rq + Rq*H*(Dn+Dr) (or D*H*(Dn+Dr) without q_lora_rank Rq),
                kv_a D*(Rkv+Dr), kv_b Rkv*H*(Dn+Dv), o H*Dv*D; its latent norms Rq + Rkv
                count as norms
    norms       per layer attn_norm D and mlp_norm D, plus q_norm and k_norm hd each when
                model.qk_norm; the final norm D
    dense_mlp   per dense layer 3*D*F (gate, up, down)
    router      per MoE layer E*D
    experts     per MoE layer E*3*D*Fe (all routed experts)
    shared      per MoE layer 3*D*Fs, plus D for the shared gate when moe.shared_gate
    mtp         per multi-token prediction depth (model.mtp_depths, model/mtp.py) enorm, hnorm
                and its final norm 3*D, eh_proj 2*D*D, and one block counted as above (MoE
                or dense as layer L + depth would be); the embedding and head are shared
total is the sum of the eight. active (per token) follows the convention behind the published
figures (Mixtral 8x7B 46.7B / 12.9B, Qwen3-30B-A3B 30.5B / 3.3B): every parameter except the
routed experts a token does not pick, total - (E - K)*3*D*Fe per MoE layer. The input embedding
and the untied LM head are both counted in full, each matrix once (a tied matrix once). Dropping
the embedding instead would undershoot Mixtral 8x7B's 12.9B by 1%.

FLOPs per token, the Megatron way (Narayanan et al. 2021, appendix; Megatron-LM's
num_floating_point_operations): a matmul of (m x n) by (n x k) costs 2*m*n*k, and only matmuls
count (no norms, rotary, softmax, activations, bias adds or embedding lookup). Forward, per layer:
    attention projections  2*D*(H + 2*KV)*hd + 2*H*hd*D
    attention scores       2*S*H*hd: QK^T and PV each cost 2*S*H*hd against all S keys; under
                           the causal mask a query sees S/2 keys on average, so each is counted
                           for the causal half (Megatron does the same); MLA S*H*(Dn+Dr+Dv)
                           (its projections: 2 * its attention parameters)
    dense MLP              2*3*D*F
    MoE                    2*D*E router + K*2*3*D*Fe routed experts actually used
                           + 2*3*D*Fs + 2*D shared expert and gate
plus the LM head 2*D*V once, and per MTP depth eh_proj 2*2*D*D, its block and the LM head
again. Training multiplies by 3 (forward, input gradients, weight
gradients). Capacity factors and padding are ignored: the count is the useful work of a dropless
MoE, which is what MFU divides by. docs/flops.md has a worked example.
"""

from __future__ import annotations

from dataclasses import dataclass

from moefold.config import ModelConfig, MoEConfig


@dataclass(frozen=True, kw_only=True)
class ParameterCount:
    """Parameter totals by family; `total` is the sum of the eight families."""

    total: int  # every parameter
    active: int  # parameters a token passes through: total minus the unpicked routed experts
    embedding: int  # input embedding plus the LM head when untied
    attention: int  # q/k/v/o projections and their biases
    dense_mlp: int  # SwiGLU MLPs of the dense layers
    experts: int  # all routed experts of all MoE layers
    shared: int  # shared experts and their gates
    router: int  # router weights
    norms: int  # every RMSNorm weight, q_norm/k_norm included
    mtp: int = 0  # the multi-token prediction depths (their blocks included)


def _num_moe_layers(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> int:
    return sum(moe_cfg.is_moe_layer(i) for i in range(model_cfg.layers))


def _swiglu(width: int, hidden: int) -> int:
    return 3 * width * hidden


def mla_split(m: ModelConfig) -> tuple[int, int]:
    """(replicated, head-split) projection weights of one MLA layer: the down projections
    q_a_proj and kv_a_proj stay whole under tp, q_b_proj (or q_proj), kv_b_proj and o_proj
    split by heads."""
    d, qk = m.hidden, m.qk_nope_head_dim + m.qk_rope_head_dim
    rq, rkv = m.q_lora_rank, m.kv_lora_rank
    down = d * rq + d * (rkv + m.qk_rope_head_dim)
    up = (rq or d) * m.heads * qk + rkv * m.heads * (m.qk_nope_head_dim + m.v_head_dim)
    return down, up + m.heads * m.v_head_dim * d


def _mla_parameters(m: ModelConfig) -> tuple[int, int]:
    """(projection weights, latent norm weights) of one MLA layer."""
    return sum(mla_split(m)), m.q_lora_rank + m.kv_lora_rank


def count_parameters(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> ParameterCount:
    """Count parameters analytically (see the module docstring for the formulas).

    Args:
        model_cfg: the dense shape.
        moe_cfg: expert layers; `num_experts == 0` means every layer is dense.

    Returns:
        A ParameterCount whose families sum to `total`.
    """
    d, hd = model_cfg.hidden, model_cfg.resolved_head_dim
    q_width, kv_width = model_cfg.heads * hd, model_cfg.kv_heads * hd
    num_moe = _num_moe_layers(model_cfg, moe_cfg)
    num_dense = model_cfg.layers - num_moe

    tables = 1 if model_cfg.tie_embeddings else 2
    embedding = tables * model_cfg.vocab_size * d
    attention_per_layer = d * (q_width + 2 * kv_width) + q_width * d
    if model_cfg.attn_bias:
        attention_per_layer += q_width + 2 * kv_width
    norms_per_layer = 2 * d + (2 * hd if model_cfg.qk_norm else 0)
    if model_cfg.mla:
        attention_per_layer, latent_norms = _mla_parameters(model_cfg)
        norms_per_layer += latent_norms
    one_expert = _swiglu(d, moe_cfg.ffn_hidden)
    shared_per_layer = _swiglu(d, moe_cfg.shared_ffn_hidden) + (d if moe_cfg.shared_gate else 0)

    counts = {
        "embedding": embedding,
        "attention": model_cfg.layers * attention_per_layer,
        "dense_mlp": num_dense * _swiglu(d, model_cfg.ffn_hidden),
        "experts": num_moe * moe_cfg.num_experts * one_expert,
        "shared": num_moe * shared_per_layer,
        "router": num_moe * moe_cfg.num_experts * d,
        "norms": model_cfg.layers * norms_per_layer + d,
    }
    depths = model_cfg.mtp_depths
    mtp_moe = sum(moe_cfg.is_moe_layer(model_cfg.layers + k) for k in range(depths))
    counts["mtp"] = (
        depths * (attention_per_layer + norms_per_layer + 3 * d + 2 * d * d)
        + (depths - mtp_moe) * _swiglu(d, model_cfg.ffn_hidden)
        + mtp_moe * (moe_cfg.num_experts * (one_expert + d) + shared_per_layer)
    )
    total = sum(counts.values())
    unpicked = (num_moe + mtp_moe) * (moe_cfg.num_experts - moe_cfg.topk) * one_expert
    return ParameterCount(total=total, active=total - unpicked, **counts)


def flops_per_token(
    model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int, *, training: bool = True
) -> float:
    """Matmul FLOPs per token, Megatron convention (see the module docstring).

    Args:
        model_cfg: the dense shape.
        moe_cfg: expert layers; only the top-k routed experts count.
        seq_len: tokens per sequence S; sets the causal attention-score cost.
        training: count forward + backward (3x forward) when True, forward only when False.

    Returns:
        FLOPs per token, as a float.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    d, hd = model_cfg.hidden, model_cfg.resolved_head_dim
    q_width, kv_width = model_cfg.heads * hd, model_cfg.kv_heads * hd
    num_moe = _num_moe_layers(model_cfg, moe_cfg)
    num_dense = model_cfg.layers - num_moe

    projections = 2 * d * (q_width + 2 * kv_width) + 2 * q_width * d
    scores = 2 * seq_len * q_width  # QK^T and PV, 2*S*H*hd each, halved for the causal mask
    if model_cfg.mla:
        projections = 2 * _mla_parameters(model_cfg)[0]
        m = model_cfg
        scores = seq_len * m.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    dense_mlp = 2 * _swiglu(d, model_cfg.ffn_hidden)
    moe = (
        2 * d * moe_cfg.num_experts
        + moe_cfg.topk * 2 * _swiglu(d, moe_cfg.ffn_hidden)
        + 2 * _swiglu(d, moe_cfg.shared_ffn_hidden)
        + (2 * d if moe_cfg.shared_gate else 0)
    )
    lm_head = 2 * d * model_cfg.vocab_size
    forward = (
        model_cfg.layers * (projections + scores) + num_dense * dense_mlp + num_moe * moe + lm_head
    )
    depths = model_cfg.mtp_depths
    mtp_moe = sum(moe_cfg.is_moe_layer(model_cfg.layers + k) for k in range(depths))
    forward += depths * (2 * 2 * d * d + projections + scores + lm_head)
    forward += (depths - mtp_moe) * dense_mlp + mtp_moe * moe
    return float(3 * forward if training else forward)


def _human(count: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def describe(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> str:
    """One-line size summary, e.g. '46.70B total, 12.88B active'."""
    counts = count_parameters(model_cfg, moe_cfg)
    return f"{_human(counts.total)} total, {_human(counts.active)} active"
