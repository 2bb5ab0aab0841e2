"""AdamW with decoupled weight decay on matrices only, warmup + cosine LR, global-norm clipping."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from moefold.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every matrix except embeddings; never norms, biases or the embedding table.

    Embeddings are excluded by choice (as in nanoGPT/torchtitan defaults): decaying rare-token
    rows toward zero hurts them more than it regularises.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name.startswith("embed.")
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=True,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, cosine to the floor."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(
    params: Iterable[torch.Tensor],
    max_norm: float,
    sum_of_squares_over_ranks: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Clip by the global norm; `sum_of_squares_over_ranks` adds the squares held elsewhere.

    Parallel code passes a reduction that counts every distinct gradient shard exactly once;
    at world size 1 it is the identity.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.zeros((), dtype=torch.float32)
    if grads:
        local = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    total_norm = sum_of_squares_over_ranks(local).sqrt()
    if max_norm > 0 and grads:
        scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total_norm
