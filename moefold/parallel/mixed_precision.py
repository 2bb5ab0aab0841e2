"""Megatron-style mixed precision: where a low-precision parameter's gradient lives.

With `train.dtype = "bf16"` the model's parameters are bf16 (moefold/model/init.py
`materialize`), the optimizer keeps fp32 main parameters and moments (optimizer.py), and the
gradient is accumulated and reduced in `train.grad_reduce_dtype`:

- "fp32" (default, Megatron's `accumulate_allreduce_grads_in_fp32`): a post-accumulate-grad
  hook moves each backward's bf16 `.grad` into an fp32 `main_grad` attribute of the parameter
  and frees it, so micro-batches sum in fp32 and the buckets (grad_buckets.py) reduce fp32.
- "bf16": the bf16 `.grad` autograd accumulates is what the buckets reduce (half the bytes on
  the wire); the optimizer upcasts the reduced sum into its fp32 main gradient.

Everything that reads or writes a gradient goes through `grad_of` / `set_grad`, so fp32
training (no `main_grad` anywhere) takes exactly the path it took before.
"""

from __future__ import annotations

import torch
from torch import nn

MAIN_GRAD = "main_grad"


def grad_of(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient the reduction and the optimizer use: `main_grad` where there is one."""
    return getattr(param, MAIN_GRAD) if hasattr(param, MAIN_GRAD) else param.grad


def set_grad(param: nn.Parameter, value: torch.Tensor | None) -> None:
    if hasattr(param, MAIN_GRAD):
        setattr(param, MAIN_GRAD, value)
    else:
        param.grad = value


def grad_dtype(param: nn.Parameter) -> torch.dtype:
    """The dtype `grad_of(param)` has (for a gradient that never arrived: zeros of it)."""
    return torch.float32 if hasattr(param, MAIN_GRAD) else param.dtype


def _to_main_grad(param: nn.Parameter) -> None:
    grad, param.grad = param.grad, None
    main = getattr(param, MAIN_GRAD)
    if main is None:
        setattr(param, MAIN_GRAD, grad.float())
    else:
        main.add_(grad)


def accumulate_in_fp32(params: list[nn.Parameter]) -> None:
    """Give every trainable non-fp32 parameter an fp32 `main_grad` fed by a hook. Must run
    before any other post-accumulate-grad hook is registered (the overlap hooks of
    grad_buckets.py count a gradient as final only once it is in `main_grad`). Idempotent."""
    for param in params:
        if param.requires_grad and param.dtype != torch.float32 and not hasattr(param, MAIN_GRAD):
            setattr(param, MAIN_GRAD, None)
            param.register_post_accumulate_grad_hook(_to_main_grad)
