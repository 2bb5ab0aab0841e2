"""Config mapping between transformers' config.json and moefold's ModelConfig / MoEConfig.

Families (config.json `model_type` -> transformers class):
    llama      LlamaForCausalLM      dense
    qwen2      Qwen2ForCausalLM      dense, q/k/v bias
    qwen3      Qwen3ForCausalLM      dense, q/k norm
    mixtral    MixtralForCausalLM    every layer MoE, softmax over the top-k logits
    qwen2_moe  Qwen2MoeForCausalLM   softmax then top-k (optionally renormalised), sigmoid-gated
                                     shared expert (zero width = none), dense layers by
                                     mlp_only_layers
    qwen3_moe  Qwen3MoeForCausalLM   as qwen2_moe without shared expert, with q/k norm
    deepseek_v3 DeepseekV3ForCausalLM MLA, sigmoid router with expert bias and node-limited
                                     groups, shared experts, dense first layers
                                     (interop/hf_deepseek.py)

Export picks the family from the config (hf_family); import canonicalises Qwen's
"softmax, top-k, renormalise" to moefold's equal "softmax over the top-k logits"
(pre_softmax=false). Training-only settings (aux/z losses, capacity, dispatcher) are not mapped:
transformers' pooled load-balancing loss is defined differently, so imports take moefold's
defaults and exports leave transformers' defaults.
"""

from __future__ import annotations

import logging

import torch

from moefold.config import ModelConfig, MoEConfig
from moefold.interop import hf_deepseek
from moefold.interop.hf_config_check import check_hf_config

logger = logging.getLogger(__name__)

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    hf_deepseek.FAMILY: hf_deepseek.ARCHITECTURE,
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
DEFAULT_MAX_POSITIONS = 4096


def _unsupported(field: str, message: str) -> ValueError:
    return ValueError(f"config.json: {field}: {message}")


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise _unsupported(
            "rope_parameters",
            f"rope_type {kind!r} is not supported; "
            "moefold implements plain RoPE (rope_type 'default') only",
        )
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_supported(hf: dict, family: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", f"{hf['hidden_act']!r}; moefold MLPs are SwiGLU (silu)")
    if family in ("llama", "qwen3", "qwen3_moe") and hf.get("attention_bias"):
        raise _unsupported(
            "attention_bias",
            "true biases o_proj too; moefold's attention has q/k/v bias only (model.attn_bias)",
        )
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias", "MLP biases are not supported")
    if family == "mixtral" and hf.get("sliding_window") is not None:
        raise _unsupported(
            "sliding_window",
            "sliding-window attention is not supported; "
            "set it to null if every context fits in the window",
        )
    if family != "mixtral" and hf.get("use_sliding_window"):
        raise _unsupported("use_sliding_window", "sliding-window attention is not supported")


def _moe_layer_pattern(hf: dict, num_layers: int) -> tuple[int, int] | None:
    """(first_dense_layers, layer_freq) reproducing Qwen's mlp_only_layers/decoder_sparse_step,
    or None when no layer is MoE."""
    step = hf.get("decoder_sparse_step") or 1
    dense_only = set(hf.get("mlp_only_layers") or [])
    moe = [i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0]
    if not moe:
        return None
    first = moe[0]
    freq = moe[1] - moe[0] if len(moe) > 1 else num_layers
    if moe != list(range(first, num_layers, freq)):
        raise _unsupported(
            "mlp_only_layers",
            f"MoE layers {moe} are not 'the first k dense, "
            "then every n-th' (moe.first_dense_layers, moe.layer_freq)",
        )
    return first, freq


def _moe_from_hf(hf: dict, family: str, num_layers: int) -> MoEConfig:
    if family not in MOE_FAMILIES:
        return MoEConfig()
    topk = hf["num_experts_per_tok"]
    if family == "mixtral":
        return MoEConfig(
            num_experts=hf["num_local_experts"], topk=topk, ffn_hidden=hf["intermediate_size"]
        )
    num_experts = hf.get("num_experts", hf.get("num_local_experts", 0))
    pattern = _moe_layer_pattern(hf, num_layers) if num_experts else None
    if pattern is None:
        return MoEConfig()
    shared = hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
    # Softmax, top-k, renormalise equals a softmax over the top-k logits: the canonical form.
    renormalised = bool(hf.get("norm_topk_prob", False))
    return MoEConfig(
        num_experts=num_experts,
        topk=topk,
        ffn_hidden=hf["moe_intermediate_size"],
        first_dense_layers=pattern[0],
        layer_freq=pattern[1],
        pre_softmax=not renormalised,
        shared_ffn_hidden=shared,
        shared_gate=shared > 0,
    )


def config_from_hf(hf: dict) -> tuple[ModelConfig, MoEConfig]:
    """moefold model and MoE configs equivalent to a transformers config.json dict.

    Raises ValueError naming the field when it is missing, mistyped, out of sane bounds
    (hf_config_check) or describes a model moefold cannot hold.
    """
    family = hf.get("model_type") if isinstance(hf, dict) else None
    if not isinstance(family, str) or family not in FAMILIES:
        raise _unsupported(
            "model_type", f"{family!r} is not supported; moefold reads {', '.join(FAMILIES)}"
        )
    check_hf_config(hf)
    _check_supported(hf, family)
    if family == hf_deepseek.FAMILY:
        return hf_deepseek.config_from_deepseek(hf)
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    model = ModelConfig(
        hidden=hidden,
        layers=hf["num_hidden_layers"],
        heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        head_dim=0 if head_dim * heads == hidden else head_dim,
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        attn_bias=family == "qwen2" or (family == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    return model, _moe_from_hf(hf, family, model.layers)


def _export_problems(moe: MoEConfig) -> list[str]:
    if not moe.enabled:
        return []
    checks = (
        (moe.score != "softmax", "moe.score='sigmoid' (the families route with softmax)"),
        (moe.scaling_factor != 1.0, "moe.scaling_factor != 1"),
        (moe.num_groups > 0, "moe.num_groups > 0 (group-limited routing)"),
        (moe.expert_bias, "moe.expert_bias=true (aux-loss-free bias on selection)"),
    )
    return [message for failed, message in checks if failed]


def hf_family(model: ModelConfig, moe: MoEConfig) -> str:
    """The transformers family that holds this model exactly; ValueError naming what cannot."""
    if model.mla:
        problems = hf_deepseek.export_problems(model, moe)
        if problems:
            raise ValueError("DeepseekV3ForCausalLM cannot hold this model: " + "; ".join(problems))
        return hf_deepseek.FAMILY
    problems = _export_problems(moe)
    if model.qk_norm and model.attn_bias:
        problems.append(
            "model.attn_bias with model.qk_norm (Qwen3's attention_bias also biases o_proj)"
        )
    if model.qk_norm and moe.shared_ffn_hidden:
        problems.append("a shared expert with model.qk_norm (Qwen3-MoE has none)")
    if moe.shared_ffn_hidden and not moe.shared_gate:
        problems.append("moe.shared_gate=false (Qwen2-MoE's shared expert is always gated)")
    if model.mtp_depths:
        problems.append("model.mtp_depths > 0 (only DeepSeek-V3 folders hold MTP layers)")
    if problems:
        raise ValueError("no transformers family holds this model: " + "; ".join(problems))
    if not moe.enabled:
        return "qwen3" if model.qk_norm else "qwen2" if model.attn_bias else "llama"
    if model.qk_norm:
        return "qwen3_moe"
    every_layer = moe.first_dense_layers == 0 and moe.layer_freq == 1
    topk_softmax = not moe.pre_softmax or moe.norm_topk_prob
    if every_layer and topk_softmax and not model.attn_bias and not moe.shared_ffn_hidden:
        return "mixtral"
    return "qwen2_moe"


def config_to_hf(
    model: ModelConfig, moe: MoEConfig, base: dict | None = None, dtype: torch.dtype | None = None
) -> dict:
    """The config.json dict of the matching family; `base` supplies token ids and
    max_position_embeddings (CARRIED_KEYS)."""
    family = hf_family(model, moe)
    if moe.enabled and moe.capacity_factor is not None:
        logger.warning("moe.capacity_factor is dropped: transformers' MoE layers are dropless")
    theta = model.rope_theta
    hf = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden,
        "intermediate_size": model.ffn_hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": model.norm_eps,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "max_position_embeddings": DEFAULT_MAX_POSITIONS,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
    }
    hf.update({k: base[k] for k in CARRIED_KEYS if base and k in base})
    if family == hf_deepseek.FAMILY:
        return {**hf, **hf_deepseek.deepseek_fields(model, moe)}
    if family in ("llama", "qwen3", "qwen3_moe"):
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family == "mixtral":
        hf.update(
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.topk,
            intermediate_size=moe.ffn_hidden,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    if family in ("qwen2_moe", "qwen3_moe"):
        hf.update(
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.topk,
            moe_intermediate_size=moe.ffn_hidden,
            decoder_sparse_step=1,
            norm_topk_prob=not moe.pre_softmax or moe.norm_topk_prob,
            mlp_only_layers=[i for i in range(model.layers) if not moe.is_moe_layer(i)],
        )
    if family == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=moe.shared_ffn_hidden, qkv_bias=model.attn_bias)
    return hf
