"""Upcycling: turn each dense SwiGLU MLP into routed experts (pure tensor math on state dicts).

Shape legend: D model dim, F dense FFN hidden, Fe = F / G expert FFN hidden, E routed experts
after upcycling, G granularity (shards per dense MLP), K experts per token.

Coarse upcycling (G = 1, "Llama 3 Meets MoE"): every expert is a copy of the dense MLP and the
router is random and small. With top-k then softmax the K chosen probabilities sum to 1, so the
MoE layer returns the dense output at step 0 for any router draw.

Fine-grained "virtual group" upcycling (G > 1; He et al. 2024, "Upcycling Large Language Models
into Mixture of Experts", and Megatron-Core's upcycling_utils): the dense MLP is cut into G
shards along F (gate and up rows paired with the matching down columns). Expert j holds shard
j mod G and router row j copies base row j div G, so the G experts of virtual group m have equal
logits, a top-k with K a multiple of G picks whole groups, and every chosen group reassembles
the dense MLP. The MoE output is then the dense output y scaled by 1/a:
    top-k then softmax:  the K probabilities sum to 1 and the G members of a chosen group share
                         one value, so group m adds p_m * y with sum_m p_m = 1/G:   a = G
    softmax then top-k:  under a uniform router every expert gets 1/E, so each of the K/G
                         chosen groups adds y/E:    a = E * G / K  (= E0 * G^2 / K, E0 = E / G)
The second is exact only for a uniform router; a small router init keeps it close.

Scaling rules multiply the expert weights so that the expert output grows by a:
    paper         every matrix of the MLP times a^(1/3): exact for a squared-ReLU MLP (its up
                  projection enters squared), approximate for SwiGLU (silu is not homogeneous)
    megatron      Megatron-Core's rule: a^(1/2) on both matrices of a ReLU/GELU MLP, a^(1/3) on
                  every matrix of a gated or squared-ReLU MLP, so for SwiGLU it equals `paper`
    swiglu_exact  SwiGLU only: up and down times a^(1/2), gate unchanged; exact because the
                  output is linear in up and in down
    none          no scaling
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from moefold.config import ModelConfig, MoEConfig
from moefold.model.init import name_seed

RouterOrder = Literal["topk_then_softmax", "softmax_then_topk"]
Scaling = Literal["paper", "megatron", "swiglu_exact", "none"]
Activation = Literal["swiglu", "relu", "gelu", "squared_relu"]
ROUTER_ORDERS = ("topk_then_softmax", "softmax_then_topk")
SCALINGS = ("paper", "megatron", "swiglu_exact", "none")

_DENSE_MLP = re.compile(r"^layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True, kw_only=True)
class UpcycleSpec:
    """How to upcycle: the MoE shape, the router order and the weight-scaling rule."""

    num_experts: int  # routed experts E after upcycling (E / G virtual groups)
    topk: int  # experts per token K; a multiple of granularity
    granularity: int = 1  # G: shards per dense MLP; experts are F / G wide
    router_order: RouterOrder = "topk_then_softmax"  # softmax over the K chosen, or over all E
    scaling: Scaling = "swiglu_exact"  # how expert weights undo the 1/a output scale
    router_std: float = 1e-3  # std of the random base router rows (small: near-uniform)
    seed: int = 0  # seed of the router draw (per layer, keyed by parameter name)

    def __post_init__(self) -> None:
        if self.granularity < 1:
            raise ValueError(f"granularity: must be >= 1, got {self.granularity}")
        if self.num_experts < 1 or self.num_experts % self.granularity:
            raise ValueError(
                f"experts: {self.num_experts} is not a positive multiple of granularity="
                f"{self.granularity}; every virtual group holds G experts, so pick E = n * G"
            )
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk: must be between 1 and experts={self.num_experts}")
        if self.topk % self.granularity:
            raise ValueError(
                f"topk: {self.topk} is not a multiple of granularity={self.granularity}; a "
                "token must pick whole virtual groups (all G shards of a dense MLP), so use "
                f"topk = {self.granularity} * n"
            )
        if self.router_order not in ROUTER_ORDERS:
            raise ValueError(f"router_order: choose one of {', '.join(ROUTER_ORDERS)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling: choose one of {', '.join(SCALINGS)}")
        if self.router_std < 0:
            raise ValueError(f"router_std: must be >= 0, got {self.router_std}")


def activation_scale(spec: UpcycleSpec) -> float:
    """a: the factor by which the upcycled MoE output falls short of the dense output."""
    if spec.router_order == "topk_then_softmax":
        return float(spec.granularity)
    return spec.num_experts * spec.granularity / spec.topk


def weight_scales(scaling: str, a: float, activation: Activation = "swiglu") -> dict[str, float]:
    """Multipliers per expert matrix ("gate" only for swiglu, "up", "down") for rule `scaling`.

    Non-gated activations have two matrices, called up (D -> F) and down (F -> D) here.
    """
    gated = activation == "swiglu"
    names = ("gate", "up", "down") if gated else ("up", "down")
    if scaling == "none":
        return dict.fromkeys(names, 1.0)
    if scaling == "swiglu_exact":
        if not gated:
            raise ValueError("scaling: swiglu_exact needs a SwiGLU MLP; use paper or megatron")
        return {"gate": 1.0, "up": a**0.5, "down": a**0.5}
    if scaling == "paper":
        return dict.fromkeys(names, a ** (1 / 3))
    if scaling == "megatron":
        cube_root = gated or activation == "squared_relu"
        return dict.fromkeys(names, a ** (1 / 3) if cube_root else a**0.5)
    raise ValueError(f"scaling: choose one of {', '.join(SCALINGS)}")


def upcycled_moe_config(
    dense: ModelConfig, spec: UpcycleSpec, base: MoEConfig | None = None
) -> MoEConfig:
    """The MoEConfig of the upcycled model: every layer MoE, experts F / G wide, softmax router.

    Training-only settings (aux loss, capacity, dispatcher) come from `base` (defaults if None).
    """
    if dense.ffn_hidden % spec.granularity:
        raise ValueError(
            f"granularity: the dense FFN width {dense.ffn_hidden} is not divisible by "
            f"{spec.granularity}; pick a granularity that divides it"
        )
    return dataclasses.replace(
        base or MoEConfig(),
        num_experts=spec.num_experts,
        topk=spec.topk,
        ffn_hidden=dense.ffn_hidden // spec.granularity,
        first_dense_layers=0,
        layer_freq=1,
        score="softmax",
        pre_softmax=spec.router_order == "softmax_then_topk",
        norm_topk_prob=False,
        scaling_factor=1.0,
        num_groups=0,
        group_topk=0,
        expert_bias=False,
        shared_ffn_hidden=0,
        shared_gate=False,
    )


def expand_in_proj(weight_FD: torch.Tensor, spec: UpcycleSpec, scale: float) -> torch.Tensor:
    """Dense gate or up weight [F, D] (nn.Linear layout) -> experts [E, D, Fe] times `scale`;
    expert j holds FFN shard j mod G."""
    G, E = spec.granularity, spec.num_experts
    F, D = weight_FD.shape
    shards_GDFe = weight_FD.reshape(G, F // G, D).transpose(1, 2) * scale
    return shards_GDFe.repeat(E // G, 1, 1).contiguous()


def expand_down_proj(weight_DF: torch.Tensor, spec: UpcycleSpec, scale: float) -> torch.Tensor:
    """Dense down weight [D, F] -> experts [E, Fe, D] times `scale`: the columns of shard
    j mod G."""
    G, E = spec.granularity, spec.num_experts
    D, F = weight_DF.shape
    shards_GFeD = weight_DF.reshape(D, G, F // G).permute(1, 2, 0) * scale
    return shards_GFeD.repeat(E // G, 1, 1).contiguous()


def upcycled_router(name: str, hidden: int, spec: UpcycleSpec) -> torch.Tensor:
    """Router weight [E, D]: E / G random base rows (std router_std, seeded by `name`), row j
    a copy of base row j div G so the experts of a virtual group tie."""
    generator = torch.Generator().manual_seed(name_seed(spec.seed, name))
    base = torch.randn(spec.num_experts // spec.granularity, hidden, generator=generator)
    return (base * spec.router_std).repeat_interleave(spec.granularity, dim=0)


def upcycle_tensors(
    dense: Iterable[tuple[str, torch.Tensor]], spec: UpcycleSpec
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a dense moefold state dict (name, tensor) into the upcycled MoE state dict.

    Each dense MLP matrix `layers.i.mlp.{gate,up,down}_proj.weight` becomes
    `layers.i.mlp.experts.{gate,up,down}_proj`; the router `layers.i.mlp.router.weight` is
    emitted with the gate projection. Every other tensor passes through unchanged. One dense
    tensor is expanded at a time, so the full MoE never has to sit in memory.
    """
    scales = weight_scales(spec.scaling, activation_scale(spec))
    for name, tensor in dense:
        match = _DENSE_MLP.match(name)
        if match is None:
            yield name, tensor
            continue
        layer, matrix = match.groups()
        prefix = f"layers.{layer}.mlp"
        if matrix == "gate_proj":
            router = f"{prefix}.router.weight"
            yield router, upcycled_router(router, tensor.shape[1], spec).to(tensor.dtype)
        scale = scales[matrix.removesuffix("_proj")]
        if matrix == "down_proj":
            yield f"{prefix}.experts.down_proj", expand_down_proj(tensor, spec, scale)
        else:
            yield f"{prefix}.experts.{matrix}", expand_in_proj(tensor, spec, scale)


def upcycle_model(dense: torch.nn.Module, spec: UpcycleSpec) -> torch.nn.Module:
    """A new single-process MoE Transformer upcycled from a dense one (both in memory)."""
    from moefold.model.transformer import Transformer

    moe = Transformer(dense.cfg, upcycled_moe_config(dense.cfg, spec, dense.moe_cfg))
    moe.load_state_dict(dict(upcycle_tensors(dense.state_dict().items(), spec)))
    return moe.to(next(dense.parameters()).dtype)
