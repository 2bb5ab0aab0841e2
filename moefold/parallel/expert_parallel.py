"""apply_ep: keep only this rank's experts (and its etp shard of them), bind a dispatcher.

Experts are owned in contiguous blocks: ep rank r holds global experts [r*e, (r+1)*e), and etp
rank j holds columns [j*F/m, (j+1)*F/m) of their gate/up projections and the same rows of their
down projection (m = etp size). This is the single place that decides which parameters are
expert parameters (gradients reduced over edp).
"""

from __future__ import annotations

import torch
from torch import nn

from moefold.dispatch import build_dispatcher
from moefold.model.experts import GroupedExperts
from moefold.model.moe import MoELayer
from moefold.parallel.data_parallel import mark_expert_parameters
from moefold.parallel.mesh import ParallelGroups


def expert_shard(num_experts: int, ffn_hidden: int, groups: ParallelGroups) -> tuple[slice, slice]:
    """(experts, ffn columns) this rank keeps."""
    ep_size, etp_size = groups.size("ep"), groups.size("etp")
    num_local = num_experts // ep_size
    width = ffn_hidden // etp_size
    ep_rank, etp_rank = groups.coord("ep"), groups.coord("etp")
    return (
        slice(ep_rank * num_local, (ep_rank + 1) * num_local),
        slice(etp_rank * width, (etp_rank + 1) * width),
    )


@torch.no_grad()
def shard_experts(experts: GroupedExperts, experts_slice: slice, ffn_slice: slice) -> None:
    experts.gate_proj = nn.Parameter(experts.gate_proj[experts_slice, :, ffn_slice].contiguous())
    experts.up_proj = nn.Parameter(experts.up_proj[experts_slice, :, ffn_slice].contiguous())
    experts.down_proj = nn.Parameter(experts.down_proj[experts_slice, ffn_slice, :].contiguous())
    experts.num_local_experts = experts.gate_proj.shape[0]


def apply_ep(model: nn.Module, groups: ParallelGroups) -> None:
    """Shard every MoE layer's experts over ep x etp and give it a dispatcher on those groups."""
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        cfg = layer.cfg
        experts_slice, ffn_slice = expert_shard(cfg.num_experts, cfg.ffn_hidden, groups)
        shard_experts(layer.experts, experts_slice, ffn_slice)
        layer.dispatcher = build_dispatcher(cfg, groups)
    mark_expert_parameters(model)
