"""One small MoE layer and per-rank tokens, shared by the dispatcher tests.

`concentrated` makes every token pick experts 0 and 1 (both on ep rank 0), leaving the other
experts and ranks idle: the edge case of every dispatcher.
"""

import torch

from moefold.config import MoEConfig
from moefold.model.moe import MoELayer

HIDDEN = 16


def make_layer(cfg: MoEConfig, concentrated: bool) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(HIDDEN, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if concentrated:
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0, 0] = 50.0
            layer.router.weight[1, 0] = 25.0
    return layer


def tokens(rank: int, concentrated: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 6, HIDDEN, generator=generator)
    if concentrated:
        x[..., 0] = x[..., 0].abs() + 1.0
    return x.requires_grad_()
