"""split_for_pipeline: keep this rank's layers and wrap each of its virtual stages.

With pp ranks and vpp virtual stages per rank there are V = pp * vpp stages; stage s holds a
contiguous block of layers and lives on pp rank s % pp (the interleaved assignment of
torch.distributed.pipelining). Layers are deleted from the ModuleDict, never renamed, so
parameter names (and checkpoints) stay those of the single-device model. The first stage
keeps the embedding; the last keeps the final norm, the LM head and the MTP depths (the first
stage embeds their ids and the stages between pass the embeddings on beside the hidden state,
so the embedding stays on the first stage alone).
"""

from __future__ import annotations

import torch
from torch import nn

from moefold.config import ParallelConfig
from moefold.model.transformer import Transformer
from moefold.parallel.mesh import ParallelGroups


def stage_layers(
    num_layers: int, num_stages: int, first: int = 0, last: int = 0
) -> list[list[str]]:
    """Layer names of each of the V stages: an even split, or `first` and `last` layers on the
    end stages (they also carry the embedding and the LM head) and an even split between.
    check_job enforces that the numbers divide."""
    if not (first or last):
        first = last = num_layers // num_stages
    counts = [first] + [0] * (num_stages - 2) + [last] if num_stages > 1 else [num_layers]
    if num_stages > 2:
        middle = (num_layers - first - last) // (num_stages - 2)
        counts[1:-1] = [middle] * (num_stages - 2)
    bounds = [sum(counts[:s]) for s in range(num_stages + 1)]
    return [[str(i) for i in range(bounds[s], bounds[s + 1])] for s in range(num_stages)]


class StageModule(nn.Module):
    """One virtual stage: a view on the rank's Transformer running a block of its layers."""

    def __init__(self, model: Transformer, layer_names: list[str], first: bool, last: bool):
        super().__init__()
        self.model = model
        self.layer_names, self.first, self.last = layer_names, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_layers(x, self.layer_names, first=self.first, last=self.last)


def split_for_pipeline(
    model: Transformer, parallel: ParallelConfig, groups: ParallelGroups
) -> list[tuple[int, StageModule]]:
    """Delete what this pp rank does not run; return its (stage index, stage module) pairs in
    ascending stage order. At pp = 1 the single stage is the whole model."""
    pp_size, pp_rank = groups.size("pp"), groups.coord("pp")
    num_stages = pp_size * parallel.vpp
    layers = stage_layers(
        len(model.layers), num_stages, parallel.pp_first_stage_layers, parallel.pp_last_stage_layers
    )
    mine = [s for s in range(num_stages) if s % pp_size == pp_rank]
    kept = {name for s in mine for name in layers[s]}
    for name in list(model.layers):
        if name not in kept:
            del model.layers[name]
    if 0 not in mine:
        model.embed = None
    if num_stages - 1 not in mine:
        model.norm = None
        model.lm_head = None
        model.mtp = None
    return [(s, StageModule(model, layers[s], s == 0, s == num_stages - 1)) for s in mine]
