"""Deterministic, layout-invariant initialisation keyed by parameter name.

Each full (unsharded) parameter is drawn from its own generator seeded by (seed, name), so the
same name gets the same values whatever the module order, the pipeline split or the parallel
layout: parallel code builds the full model, initialises it here, then keeps its shards.
Output projections (attention o_proj and every MLP/expert down_proj) use std / sqrt(2 * layers)
as in GPT-2/Megatron, so the residual stream does not grow with depth.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from moefold.config import ModelConfig


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _init_value(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if owner.endswith("norm") or leaf == "bias":
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    std = cfg.init_std
    if owner in ("o_proj", "down_proj") or leaf == "down_proj":
        std = std / (2 * cfg.layers) ** 0.5
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def init_parameters(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter of an unsharded model from its name; buffers are reset to zero
    (expert bias) by construction."""
    for name, param in model.named_parameters():
        param.copy_(_init_value(name, param.shape, cfg, seed).to(param.dtype))
