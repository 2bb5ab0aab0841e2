"""Types and sane bounds of the config.json fields moefold reads, checked before any model is
built: a downloaded config must not make `convert` build a billion-layer model, and a string
where a number belongs must be named, not surface as a TypeError deep in a constructor.

The bounds are generous (several times the largest open models: Llama-3.1-405B has 126
layers, width 16384 and FFN 53248; Gemma's vocabulary is 262144 tokens; DeepSeek-V3 has 256
experts). The folder's tensors are checked against the config separately (hf.py).
"""

from __future__ import annotations

import math

MAX_LAYERS = 1024
MAX_WIDTH = 1 << 17  # hidden_size
MAX_FFN = 1 << 20  # intermediate sizes
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 24
MAX_EXPERTS = 4096

# field -> (smallest, largest); ints, required for every family
_REQUIRED_INTS = {
    "hidden_size": (1, MAX_WIDTH),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_HEADS),
    "intermediate_size": (1, MAX_FFN),
    "vocab_size": (1, MAX_VOCAB),
}
# ints that may be absent (or null, where the mapping reads them with `or`)
_OPTIONAL_INTS = {
    "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "decoder_sparse_step": (0, MAX_LAYERS),
    "num_experts": (0, MAX_EXPERTS),
    "num_local_experts": (1, MAX_EXPERTS),
    "num_experts_per_tok": (1, MAX_EXPERTS),
    "moe_intermediate_size": (1, MAX_FFN),
    "shared_expert_intermediate_size": (0, MAX_FFN),
    # deepseek_v3 (MLA, node-limited routing, shared experts, MTP layers)
    "kv_lora_rank": (1, MAX_FFN),
    "q_lora_rank": (1, MAX_FFN),
    "qk_nope_head_dim": (0, MAX_HEAD_DIM),
    "qk_rope_head_dim": (2, MAX_HEAD_DIM),
    "v_head_dim": (1, MAX_HEAD_DIM),
    "n_routed_experts": (0, MAX_EXPERTS),
    "n_shared_experts": (0, MAX_EXPERTS),
    "n_group": (1, MAX_EXPERTS),
    "topk_group": (1, MAX_EXPERTS),
    "first_k_dense_replace": (0, MAX_LAYERS),
    "num_nextn_predict_layers": (0, MAX_LAYERS),
}
_NULLABLE = (
    "num_key_value_heads",
    "head_dim",
    "decoder_sparse_step",
    "q_lora_rank",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "num_experts_per_tok",
)
# fields the MoE families cannot do without
_REQUIRED_BY_FAMILY = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen2_moe": ("num_experts_per_tok",),
    "qwen3_moe": ("num_experts_per_tok",),
    "deepseek_v3": ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
}
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", "initializer_range", "routed_scaling_factor")
_BOOLS = (
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "norm_topk_prob",
    "qkv_bias",
    "use_sliding_window",
    "rope_interleave",
)
_STRINGS = ("model_type", "hidden_act")


def _bad(field: str, message: str) -> ValueError:
    return ValueError(f"config.json: {field}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(hf: dict, field: str, low: int, high: int) -> None:
    value = hf[field]
    if not _is_int(value):
        raise _bad(field, f"expected an integer, got {value!r}; fix the config.json")
    if not low <= value <= high:
        raise _bad(
            field,
            f"{value} is outside the sane range [{low}, {high}]; the config.json is damaged "
            "or not a language model moefold can convert",
        )


def _check_number(field: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(field, f"expected a number, got {value!r}; fix the config.json")
    if not math.isfinite(value) or value <= 0:
        raise _bad(field, f"must be a finite number > 0, got {value!r}")


def _check_moe_fields(hf: dict) -> None:
    family = hf.get("model_type")
    needed = list(_REQUIRED_BY_FAMILY.get(family, ()))
    if family in ("qwen2_moe", "qwen3_moe") and hf.get("num_experts", 0):
        needed.append("moe_intermediate_size")
    if family == "deepseek_v3" and hf.get("n_routed_experts", 0):
        needed += ["moe_intermediate_size", "num_experts_per_tok"]
    for field in needed:
        if field not in hf or hf[field] is None:
            raise _bad(field, f"required for model_type {family!r} but missing")
    experts_field = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}
    experts = hf.get(experts_field.get(family, "num_experts"), 0)
    groups, kept = hf.get("n_group"), hf.get("topk_group")
    if _is_int(groups) and _is_int(kept) and kept > groups:
        raise _bad("topk_group", f"{kept} is more than the n_group={groups} groups")
    topk = hf.get("num_experts_per_tok")
    if experts and _is_int(topk) and topk > experts:
        raise _bad("num_experts_per_tok", f"{topk} is more than the {experts} experts")
    dense_only = hf.get("mlp_only_layers")
    if dense_only is not None and not (
        isinstance(dense_only, list)
        and all(_is_int(i) and 0 <= i < hf["num_hidden_layers"] for i in dense_only)
    ):
        raise _bad(
            "mlp_only_layers",
            f"expected a list of layer indices below num_hidden_layers, got {dense_only!r}",
        )


def check_hf_config(hf: object) -> None:
    """ValueError naming the first config.json field that is missing, of the wrong type or
    outside MAX_* bounds. Fields moefold does not read are not looked at."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(hf).__name__}")
    for field in _STRINGS:
        if field in hf and not isinstance(hf[field], str):
            raise _bad(field, f"expected a string, got {hf[field]!r}")
    for field, (low, high) in _REQUIRED_INTS.items():
        if field not in hf:
            raise _bad(field, "required but missing; pass a complete transformers config.json")
        _check_int(hf, field, low, high)
    for field, (low, high) in _OPTIONAL_INTS.items():
        if field in hf and not (hf[field] is None and field in _NULLABLE):
            _check_int(hf, field, low, high)
    for field in _BOOLS:
        if hf.get(field) is not None and not isinstance(hf[field], bool):
            raise _bad(field, f"expected true or false, got {hf[field]!r}")
    for field in _POSITIVE_NUMBERS:
        if field in hf:
            _check_number(field, hf[field])
    for field in ("rope_parameters", "rope_scaling"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise _bad(field, f"expected an object or null, got {rope!r}")
        if "rope_theta" in rope:
            _check_number(f"{field}.rope_theta", rope["rope_theta"])
    _check_moe_fields(hf)
