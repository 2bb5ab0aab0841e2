"""Deterministic, layout-invariant initialisation keyed by parameter name and global index.

Every parameter's values are a function of (seed, name) only: the full tensor is drawn from
its own generator seeded by (seed, name), so the same name gets the same values whatever the
module order, the pipeline split or the parallel layout, and a rank's shard is the slice of
that draw at its global index.

Sharded construction (moefold/train/launch.py): build the model on the meta device, apply the
parallel plan (which records each parameter's cuts), then `materialize` it: storage for this
rank's shards only, one parameter at a time, each drawn whole and sliced. The start-up peak is
therefore the rank's shard plus ONE full parameter (the largest: a stacked expert matrix
[E, D, F] of one layer, or the embedding), never the whole model. Why not draw the slice
alone: torch's CPU randn fills the whole tensor from one Mersenne-Twister stream (then
transforms it in 16-value blocks); the stream cannot be skipped ahead, so a slice of those
values cannot be produced without drawing what precedes it. Drawing per expert (a generator
per (name, expert)) would bound the peak to one expert matrix, but changes every expert's
initial values, and the equivalence tests' tolerances were set on these trajectories (one
pipeline test drifts past its grad-norm tolerance at step 5 with per-expert draws).
Output projections (attention o_proj and every MLP/expert down_proj) use std / sqrt(2 * layers)
as in GPT-2/Megatron, so the residual stream does not grow with depth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from moefold.config import ModelConfig

Index = tuple[slice, ...]  # one slice per dim of the full tensor
# name, local parameter -> (full shape, index of the local values in the full tensor)
ShardIndex = Callable[[str, torch.Tensor], tuple[torch.Size, Index]]


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _std(name: str, cfg: ModelConfig) -> float:
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if owner in ("o_proj", "down_proj") or leaf == "down_proj":
        return cfg.init_std / (2 * cfg.layers) ** 0.5
    return cfg.init_std


def _is_constant(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    return owner.endswith("norm") or leaf == "bias"


def full_index(shape: torch.Size) -> Index:
    return tuple(slice(0, n) for n in shape)


def parameter_values(
    name: str, full_shape: torch.Size, cfg: ModelConfig, seed: int, index: Index | None = None
) -> torch.Tensor:
    """The fp32 values of parameter `name` (full shape `full_shape`) at `index` (default: all).
    The same (seed, name) gives the same full tensor; any index gives its exact slice."""
    full_shape = torch.Size(full_shape)
    index = full_index(full_shape) if index is None else tuple(index)
    local_shape = torch.Size(s.stop - s.start for s in index)
    if _is_constant(name):
        leaf = name.rsplit(".", 1)[-1]
        return torch.ones(local_shape) if leaf == "weight" else torch.zeros(local_shape)
    std = _std(name, cfg)
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    full = torch.randn(full_shape, generator=generator)
    if local_shape == full_shape:
        return full.mul_(std)
    return full[index] * std  # a copy of the slice; the full draw is freed on return


@torch.no_grad()
def init_parameters(
    model: nn.Module, cfg: ModelConfig, seed: int, shard_index: ShardIndex | None = None
) -> None:
    """Fill every parameter from its name (and, for a shard, its global index); buffers are
    reset to zero (expert bias) by construction."""
    for name, param in model.named_parameters():
        full_shape, index = shard_index(name, param) if shard_index else (param.shape, None)
        param.copy_(parameter_values(name, full_shape, cfg, seed, index).to(param.dtype))


@torch.no_grad()
def materialize(
    model: nn.Module,
    cfg: ModelConfig,
    seed: int,
    device: torch.device,
    shard_index: ShardIndex | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Give a meta-device model (after its parallel plan) storage on `device` for what it
    holds and fill it: each parameter from `parameter_values` of its global index, buffers
    zero (the only buffer is the router's expert bias, zero at construction).

    One parameter at a time, its drawn values becoming its storage (no empty tensor filled by
    a copy): the peak is what the rank holds plus one parameter's draw. Unlike
    `Module.to_empty`, the new parameters keep the Python attributes parallel code recorded on
    them (gradient family, cuts). `dtype` (bf16 under train.dtype = "bf16") rounds the drawn
    values; None keeps the skeleton's dtype."""
    made: dict[int, nn.Parameter] = {}  # a parameter shared by two modules stays shared
    for module_name, module in model.named_modules():
        for key, param in list(module.named_parameters(recurse=False)):
            if id(param) not in made:
                name = f"{module_name}.{key}" if module_name else key
                full_shape, index = shard_index(name, param) if shard_index else (param.shape, None)
                values = parameter_values(name, full_shape, cfg, seed, index)
                new = nn.Parameter(
                    values.to(device=device, dtype=dtype or param.dtype),
                    requires_grad=param.requires_grad,
                )
                for attr, value in vars(param).items():  # not a fake tensor's own fields
                    if attr not in vars(new):
                        setattr(new, attr, value)
                made[id(param)] = new
            setattr(module, key, made[id(param)])
        for key, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[key] = torch.zeros_like(buffer, device=device)
    for module in model.modules():  # per-step tensors made at construction live on meta
        reset = getattr(module, "reset_step_statistics", None)
        if callable(reset):
            reset()
