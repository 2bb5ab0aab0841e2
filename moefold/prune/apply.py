"""CAMERA-P: rank micro-experts per layer, zero the lowest, then pack each expert.

Shape legend: N calibration sequences, S sequence length, D model dim, E routed experts,
F routed expert width, Fs shared expert width.

Layer by layer, in order: the calibration tokens' hidden states are carried through the model
block by block, so each MoE layer is scored on inputs that already went through every earlier
pruned layer (CAMERA-P's sequential rule). In each MoE layer the floor(ratio * units) units
with the lowest scores are removed, ranked together over all routed experts and the shared
expert, so experts end with unequal widths. No fine-tuning, no reconstruction.

Storage of unequal widths (docs/companions.md): a removed unit is zeroed in all three
matrices, then every expert's live units are moved to its first columns (a permutation of
hidden units does not change an expert's function) and the stored width shrinks to the widest
live expert of the model, rounded up to a multiple of 16 (prune/pack.py). Narrower experts
keep zero columns up to that width. A zero unit contributes exactly nothing (silu(0) * 0 = 0
times a zero row), and it gets exactly zero gradients (d/dgate = silu'(0) * up = 0,
d/dup = silu(0) = 0, d/ddown = phi = 0), so AdamW with weight decay keeps it at zero: the
pruned checkpoint is an ordinary moefold checkpoint that trains, generates, reshards under any
layout and exports to HF unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moefold.model.init import name_seed
from moefold.model.moe import MoELayer
from moefold.model.transformer import Transformer, rotary_tables
from moefold.prune.scoring import (
    METHODS,
    ActivationEnergy,
    LayerScores,
    accumulate_energy,
    camera_scores,
    magnitude_scores,
    random_scores,
)


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: the fraction of micro-experts per MoE layer and how to rank them."""

    ratio: float
    method: str = "camera"
    rho: float = 0.9  # weight of the max term (the released DeepSeek-MoE script's 0.9)
    seed: int = 0  # random method only

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"--ratio: must be in [0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise ValueError(f"--method: choose one of {', '.join(METHODS)}, got {self.method}")
        if not 0 <= self.rho <= 1:
            raise ValueError(f"--rho: must be in [0, 1], got {self.rho}")


@dataclass(frozen=True)
class KeepMask:
    """Which units of one MoE layer survive: routed [E, F], shared [Fs] or None."""

    routed: torch.Tensor
    shared: torch.Tensor | None


def select(scores: LayerScores, ratio: float) -> KeepMask:
    """Drop the floor(ratio * units) lowest scores of the layer (stable: ties go to the unit
    listed first, routed experts in order, then the shared expert)."""
    flat = scores.flat()
    num_pruned = int(ratio * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:num_pruned]] = False
    routed = keep[: scores.routed.numel()].view_as(scores.routed)
    shared = keep[scores.routed.numel() :] if scores.shared is not None else None
    return KeepMask(routed, shared)


@torch.no_grad()
def zero_units(layer: MoELayer, keep: KeepMask) -> None:
    """Zero every removed unit's gate and up columns and down row (in place)."""
    experts = layer.experts
    mask = keep.routed.to(experts.gate_proj.dtype)  # [E, F]
    experts.gate_proj.mul_(mask[:, None, :])
    experts.up_proj.mul_(mask[:, None, :])
    experts.down_proj.mul_(mask[:, :, None])
    if keep.shared is not None:
        shared, mask = layer.shared_expert, keep.shared.to(experts.gate_proj.dtype)
        shared.gate_proj.weight.mul_(mask[:, None])
        shared.up_proj.weight.mul_(mask[:, None])
        shared.down_proj.weight.mul_(mask[None, :])


def _layer_scores(layer: MoELayer, spec: PruneSpec, name: str, inputs) -> LayerScores:
    if spec.method == "camera":
        energy = ActivationEnergy.zeros(layer)
        for x_BSD in inputs:
            accumulate_energy(layer, x_BSD, energy)
        return camera_scores(layer, energy, spec.rho)
    if spec.method == "magnitude":
        return magnitude_scores(layer)
    return random_scores(layer, torch.Generator().manual_seed(name_seed(spec.seed, name)))


@torch.no_grad()
def prune_in_place(
    model: Transformer, spec: PruneSpec, calibration_NS: torch.Tensor | None, micro_batch: int = 4
) -> dict[str, KeepMask]:
    """Zero the lowest-ranked units of every MoE layer, in layer order; returns the keep masks
    by block name. `calibration_NS` (token ids) is needed by the camera method only."""
    model.eval()
    moe_blocks = {n: b for n, b in model.layers.items() if isinstance(b.mlp, MoELayer)}
    if spec.method != "camera" or spec.ratio == 0:
        masks = {}
        for name, block in moe_blocks.items():
            masks[name] = select(_layer_scores(block.mlp, spec, name, []), spec.ratio)
            zero_units(block.mlp, masks[name])
        return masks
    if calibration_NS is None:
        raise ValueError("--method camera needs calibration tokens")
    positions_S = torch.arange(calibration_NS.shape[1])
    rope = rotary_tables(positions_S, model.cfg.resolved_head_dim, model.cfg.rope_theta)
    hidden = [model.embed(chunk) for chunk in calibration_NS.split(micro_batch)]
    masks = {}
    for name, block in model.layers.items():
        # Block._forward, split at the MLP: the MLP input is scored before this layer is
        # pruned; the layer's output (carried on) comes from the pruned layer.
        mids = [h + block.attn(block.attn_norm(h), positions_S, rope) for h in hidden]
        if name in moe_blocks:
            inputs = [block.mlp_norm(m) for m in mids]
            masks[name] = select(_layer_scores(block.mlp, spec, name, inputs), spec.ratio)
            zero_units(block.mlp, masks[name])
        hidden = [m + block.mlp(block.mlp_norm(m)) for m in mids]
    return masks
