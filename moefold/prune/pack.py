"""Pack pruned experts: live units first, stored width = the widest live expert (rounded up).

Shape legend: E routed experts, D model dim, F stored routed width, Fs stored shared width.
A unit is live unless its gate column, up column and down row are all zero.
"""

from __future__ import annotations

import dataclasses

import torch

from moefold.model.moe import MoELayer
from moefold.model.transformer import Transformer

WIDTH_MULTIPLE = 16  # stored widths: multiples of this (capped at the original width), so any
# etp up to 16 divides them and grouped_mm's 16-byte rows hold.


def _live_routed(layer: MoELayer) -> torch.Tensor:
    experts = layer.experts
    return (
        experts.gate_proj.ne(0).any(1)
        | experts.up_proj.ne(0).any(1)
        | experts.down_proj.ne(0).any(2)
    )  # [E, F]


def _live_shared(layer: MoELayer) -> torch.Tensor | None:
    s = layer.shared_expert
    if s is None:
        return None
    return (
        s.gate_proj.weight.ne(0).any(1)
        | s.up_proj.weight.ne(0).any(1)
        | s.down_proj.weight.ne(0).any(0)
    )


def live_widths(model: Transformer) -> dict[str, dict]:
    """Per MoE block: {"routed": [live units of each expert], "shared": live shared units}."""
    widths = {}
    for name, block in model.layers.items():
        if isinstance(block.mlp, MoELayer):
            shared = _live_shared(block.mlp)
            widths[name] = {
                "routed": _live_routed(block.mlp).sum(1).tolist(),
                "shared": None if shared is None else int(shared.sum()),
            }
    return widths


def stored_width(max_live: int, original: int) -> int:
    rounded = -(-max(max_live, 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    return min(original, rounded)


def _order(live: torch.Tensor) -> torch.Tensor:
    """Column order that puts live units first, each group in its original order."""
    return torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices


@torch.no_grad()
def pack(model: Transformer) -> Transformer:
    """A new model whose experts hold their live units first, at the smallest stored widths
    that fit every expert; the same function as `model` (only zero units are cut)."""
    widths = live_widths(model)
    moe = model.moe_cfg
    max_routed = max((max(w["routed"]) for w in widths.values()), default=moe.ffn_hidden)
    max_shared = max((w["shared"] or 0 for w in widths.values()), default=0)
    new_moe = dataclasses.replace(
        moe,
        ffn_hidden=stored_width(max_routed, moe.ffn_hidden),
        shared_ffn_hidden=(
            stored_width(max_shared, moe.shared_ffn_hidden) if moe.shared_ffn_hidden else 0
        ),
    )
    packed = Transformer(model.cfg, new_moe).to(next(model.parameters()).dtype)
    state = model.state_dict()
    for name, block in model.layers.items():
        if not isinstance(block.mlp, MoELayer):
            continue
        prefix, width = f"layers.{name}.mlp.", new_moe.ffn_hidden
        order = _order(_live_routed(block.mlp))[:, :width]  # [E, F']
        E, D = order.shape[0], model.cfg.hidden
        for key in ("gate_proj", "up_proj"):  # [E, D, F]: pick columns
            full = state[f"{prefix}experts.{key}"]
            state[f"{prefix}experts.{key}"] = full.gather(2, order[:, None, :].expand(E, D, width))
        full = state[f"{prefix}experts.down_proj"]  # [E, F, D]: pick rows
        state[f"{prefix}experts.down_proj"] = full.gather(1, order[:, :, None].expand(E, width, D))
        if block.mlp.shared_expert is not None:
            order = _order(_live_shared(block.mlp))[: new_moe.shared_ffn_hidden]
            for key, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                full = state[f"{prefix}shared_expert.{key}.weight"]
                state[f"{prefix}shared_expert.{key}.weight"] = full.index_select(dim, order)
    packed.load_state_dict(state)
    return packed.eval()
