"""DeepseekV3ForCausalLM (config.json `model_type` "deepseek_v3") <-> moefold: configs, tensor
names and the rotary row order. hf_config.py and hf.py call in here for that family.

Model: MLA attention (model/mla.py), the first `first_k_dense_replace` layers dense, then every
layer MoE: sigmoid router with `e_score_correction_bias` (moefold's expert bias), group-limited
("node-limited") routing whose group score is the sum of each group's best two biased scores
(moe.group_score_topk = 2), renormalised top-k weights times `routed_scaling_factor`
(moe.scaling_factor), and `n_shared_experts` ungated shared experts of `moe_intermediate_size`
each, which moefold holds as one shared expert of their summed width (the same SwiGLU).

Rotary order: DeepSeek's checkpoints rotate interleaved pairs (`rope_interleave`, true by
default); moefold rotates halves. Import reorders the rotary rows of q_b_proj (or q_proj) per
head and of kv_a_proj_with_mqa to evens-then-odds, export restores the interleaved order: the
logits are equal and a round trip is bit-exact.

MTP: transformers 5.25 builds no multi-token-prediction module; its weights sit in DeepSeek's
folders as extra layers `model.layers.{L + d}.*` (`num_nextn_predict_layers` of them), which
transformers skips. moefold imports the depths a folder holds (model.mtp_depths = the number of
extra layers present; a folder saved by transformers has none) as model/mtp.py's `mtp.{d}.*`:
the depth's block under the decoder-layer names, and `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm` (moefold's `final_norm`). DeepSeek's copies of the shared embedding and head
in those layers (`embed_tokens`, `shared_head.head`) are skipped on import and not written on
export (the main model's are the ones used); export writes `num_nextn_predict_layers` =
model.mtp_depths and the depths' layers.

Training-only settings are DeepSeek-V3's recipe where the config implies it: expert bias on
(the bias is part of the checkpoint) and the sequence-wise balance loss at 1e-4.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from moefold.config import ModelConfig, MoEConfig

FAMILY = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
GROUP_SCORE_TOPK = 2  # transformers and DeepSeek sum each group's best two scores

LAYER_RENAMES = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    **{
        f"mlp.shared_expert.{p}.weight": f"mlp.shared_experts.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj")
    },
}


# An MTP depth's own tensors (model/mtp.py) -> their names inside `model.layers.{L + d}`.
MTP_RENAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_norm.weight": "shared_head.norm.weight",
}
# Copies of the shared embedding and LM head in DeepSeek's MTP layers: not read, not written.
MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_MTP_NAME = re.compile(r"^mtp\.(\d+)\.(.+)$")


def layer_view(name: str, model: ModelConfig) -> tuple[str, str | None]:
    """How interop names a moefold tensor: (name under which the decoder-layer mapping applies,
    HF key when the tensor is an MTP depth's own). `mtp.{d}.block.X` is `layers.{L + d}.X`."""
    match = _MTP_NAME.match(name)
    if match is None:
        return name, None
    layer, rest = model.layers + int(match.group(1)), match.group(2)
    if rest.startswith("block."):
        return f"layers.{layer}.{rest.removeprefix('block.')}", None
    return name, f"model.layers.{layer}.{MTP_RENAMES[rest]}"


def mtp_depths_held(layer_indices: set[int], num_layers: int, declared: int) -> int:
    """MTP depths a folder holds: the declared `num_nextn_predict_layers` when its layers
    L..L+n-1 are present, else 0 (transformers saves none)."""
    extra = {i for i in layer_indices if i >= num_layers}
    return declared if declared and extra == set(range(num_layers, num_layers + declared)) else 0


def _unsupported(field: str, message: str) -> ValueError:
    return ValueError(f"config.json: {field}: {message}")


def _rope(hf: dict) -> dict:
    """moefold's rotary fields from rope_parameters (or the older rope_scaling)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "yarn":
        raise _unsupported("rope_parameters", f"rope_type {kind!r}; moefold reads default, yarn")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
        raise _unsupported(
            "rope_parameters", "attention_factor and truncate=false are not supported with yarn"
        )
    if not isinstance(rope.get("factor"), (int, float)) or rope["factor"] < 1:
        raise _unsupported("rope_parameters.factor", "yarn needs a number factor >= 1")
    original = rope.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise _unsupported(
            "rope_parameters.original_max_position_embeddings", "yarn needs a positive integer"
        )
    return {
        "rope_theta": theta,
        "yarn_factor": float(rope["factor"]),
        "yarn_original_max_positions": original,
        "yarn_beta_fast": float(rope.get("beta_fast") or 32),
        "yarn_beta_slow": float(rope.get("beta_slow") or 1),
        "yarn_mscale": float(rope.get("mscale") or 0.0),
        "yarn_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
    }


def _moe(hf: dict, num_layers: int) -> MoEConfig:
    first_dense = hf.get("first_k_dense_replace") or 0
    num_experts = hf.get("n_routed_experts") or 0
    if first_dense >= num_layers or not num_experts:
        return MoEConfig()
    topk, groups = hf["num_experts_per_tok"], hf.get("n_group") or 1
    norm = bool(hf.get("norm_topk_prob", True))
    if topk == 1 and norm:
        raise _unsupported(
            "norm_topk_prob",
            "true with num_experts_per_tok=1 sets the one weight to 1; moefold (as "
            "Megatron-Core) keeps the score there; set norm_topk_prob=false or topk > 1",
        )
    if num_experts % groups or (groups > 1 and num_experts // groups < GROUP_SCORE_TOPK):
        raise _unsupported("n_group", "must divide n_routed_experts into groups of >= 2")
    limited = groups > 1
    return MoEConfig(
        num_experts=num_experts,
        topk=topk,
        ffn_hidden=hf["moe_intermediate_size"],
        first_dense_layers=first_dense,
        score="sigmoid",
        norm_topk_prob=norm,
        scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        num_groups=groups if limited else 0,
        group_topk=(hf.get("topk_group") or groups) if limited else 0,
        group_score_topk=GROUP_SCORE_TOPK if limited else 0,
        aux_loss="seq_aux",
        aux_loss_coeff=1e-4,
        expert_bias=True,
        shared_ffn_hidden=(hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"],
    )


def config_from_deepseek(hf: dict) -> tuple[ModelConfig, MoEConfig]:
    """moefold configs of a checked deepseek_v3 config.json (hf_config_check ran)."""
    if hf.get("attention_bias"):
        raise _unsupported("attention_bias", "MLA projections without bias only")
    heads = hf["num_attention_heads"]
    model = ModelConfig(
        hidden=hf["hidden_size"],
        layers=hf["num_hidden_layers"],
        heads=heads,
        kv_heads=heads,
        ffn_hidden=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        kv_lora_rank=hf["kv_lora_rank"],
        q_lora_rank=hf.get("q_lora_rank") or 0,
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        **_rope(hf),
    )
    return model, _moe(hf, model.layers)


def export_problems(model: ModelConfig, moe: MoEConfig) -> list[str]:
    """What keeps an MLA model out of DeepseekV3ForCausalLM (empty: it fits)."""
    problems = []
    if model.kv_heads != model.heads:
        problems.append("model.kv_heads != model.heads")
    if not moe.enabled:
        return problems
    checks = (
        (moe.score != "sigmoid", "moe.score='softmax' (DeepSeek-V3 routes with sigmoid)"),
        (moe.layer_freq != 1, "moe.layer_freq != 1"),
        (moe.shared_gate, "moe.shared_gate=true (DeepSeek's shared experts are ungated)"),
        (moe.shared_ffn_hidden % moe.ffn_hidden != 0, "shared_ffn_hidden not n * ffn_hidden"),
        (moe.topk == 1 and moe.norm_topk_prob, "moe.norm_topk_prob with moe.topk=1"),
    )
    problems += [message for failed, message in checks if failed]
    if moe.num_groups:
        rule = moe.group_score_topk or max(1, moe.topk // moe.group_topk)
        if rule != GROUP_SCORE_TOPK:
            problems.append("a group score other than the best 2 (moe.group_score_topk=2)")
    return problems


def _rope_parameters(model: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": model.rope_theta}
    if model.yarn_factor != 1.0:
        rope.update(
            rope_type="yarn",
            factor=model.yarn_factor,
            original_max_position_embeddings=model.yarn_original_max_positions,
            beta_fast=model.yarn_beta_fast,
            beta_slow=model.yarn_beta_slow,
            mscale=model.yarn_mscale,
            mscale_all_dim=model.yarn_mscale_all_dim,
        )
    return rope


def deepseek_fields(model: ModelConfig, moe: MoEConfig) -> dict:
    """The deepseek_v3-specific config.json fields (hf_config.config_to_hf adds the rest)."""
    hf: dict[str, Any] = {
        "kv_lora_rank": model.kv_lora_rank,
        "q_lora_rank": model.q_lora_rank or None,
        "qk_nope_head_dim": model.qk_nope_head_dim,
        "qk_rope_head_dim": model.qk_rope_head_dim,
        "v_head_dim": model.v_head_dim,
        "head_dim": model.qk_rope_head_dim,
        "rope_interleave": True,
        "rope_parameters": _rope_parameters(model),
        "attention_bias": False,
        "num_nextn_predict_layers": model.mtp_depths,
        "first_k_dense_replace": moe.first_dense_layers if moe.enabled else model.layers,
    }
    if moe.enabled:
        hf.update(
            n_routed_experts=moe.num_experts,
            num_experts_per_tok=moe.topk,
            moe_intermediate_size=moe.ffn_hidden,
            n_shared_experts=moe.shared_ffn_hidden // moe.ffn_hidden,
            norm_topk_prob=moe.norm_topk_prob,
            routed_scaling_factor=moe.scaling_factor,
            n_group=moe.num_groups or 1,
            topk_group=moe.group_topk or 1,
        )
    return hf


# ---- rotary row order -------------------------------------------------------------------------


def _deinterleave(width: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])


def rope_row_order(name: str, model: ModelConfig) -> torch.Tensor | None:
    """Row order [rows] taking an HF (interleaved) weight to moefold's (halves): moefold row i
    is HF row order[i]. None for tensors without rotary rows."""
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    rope = model.qk_rope_head_dim
    if leaf in ("q_proj", "q_b_proj"):
        qk = model.qk_nope_head_dim + rope
        nope = model.qk_nope_head_dim
        head = torch.cat([torch.arange(nope), nope + _deinterleave(rope)])
        return torch.cat([h * qk + head for h in range(model.heads)])
    if leaf == "kv_a_proj":
        rank = model.kv_lora_rank
        return torch.cat([torch.arange(rank), rank + _deinterleave(rope)])
    return None


def from_hf_rows(name: str, tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    order = rope_row_order(name, model)
    return tensor if order is None else tensor[order]


def to_hf_rows(name: str, tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    order = rope_row_order(name, model)
    if order is None:
        return tensor
    out = torch.empty_like(tensor)
    out[order] = tensor
    return out
