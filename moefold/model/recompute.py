"""Selective activation recomputation (`train.recompute`): run a region of the model under
torch.utils.checkpoint so backward recomputes its activations instead of keeping them.

Modes (set once by `Transformer.set_recompute`):
- `none`:    keep every activation.
- `moe_act`: routed experts keep their SwiGLU inputs gate and up but not silu(gate); backward
             recomputes act = silu(gate) * up (`GroupedExperts.recompute_activation`).
- `moe`:     each MoE layer, with its pre-norm (mlp_norm, router, dispatch, experts, combine,
             shared expert), keeps only its input.
- `full`:    each transformer block keeps only its input.

A recomputed region runs its forward a second time inside backward, collectives included:
the dispatcher's all-to-all / all-gather over ep and etp and the router statistics over tp x cp
and dp (`moe`, `full`), and the tensor- and context-parallel collectives (`full`). Every rank of
a group backpropagates the same regions in the same order (the schedule's backward order), so
the collectives pair up; `early_stop=False` makes every recomputation run the whole region, so
no rank skips a collective that another rank runs.

Side effects. A recomputation leaves no trace in the step statistics: the context pair below
hands each router the `step_state()` it had when the original forward ran (so a `global_aux`
loss sees the same running prefix) and afterwards puts back what it held before the
recomputation; the MoE drop counters are restored the same way. Routed-token counts, expert
load, aux/z-loss metrics and the expert-bias update therefore count every token once. The aux
gradient is injected once: backward runs through the original graph, the recomputed graph
only supplies saved tensors. `CommStats` counts the bytes this rank actually sends, so under
`moe` and `full` the recomputed forward's collectives are counted a second time (the
`comm_bytes` metric includes the recomputation traffic).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moefold.model.moe import MoELayer

RECOMPUTE_MODES = ("none", "moe_act", "moe", "full")


class _StepStatePin:
    """The (forward, recomputation) context pair of one checkpointed call of a region."""

    def __init__(self, moe_layers: list[MoELayer]) -> None:
        self.moe_layers = moe_layers
        self.at_forward: list = []

    def _snapshot(self) -> list:
        return [(m.router.step_state(), copy.copy(m.stats)) for m in self.moe_layers]

    def _load(self, states: list) -> None:
        for layer, (router_state, stats) in zip(self.moe_layers, states, strict=True):
            layer.router.load_step_state(router_state)
            layer.stats = copy.copy(stats)

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.at_forward = self._snapshot()
        yield

    @contextmanager
    def recomputation(self) -> Iterator[None]:
        current = self._snapshot()
        self._load(self.at_forward)
        try:
            yield
        finally:
            self._load(current)


def recomputed(fn: Callable[..., torch.Tensor], *args, region: nn.Module) -> torch.Tensor:
    """`fn(*args)` whose activations are recomputed in backward; `region` is the module `fn`
    runs (its MoE layers get their step statistics pinned, see the module docstring)."""
    pin = _StepStatePin([m for m in region.modules() if isinstance(m, MoELayer)])
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=lambda: (pin.forward(), pin.recomputation()),
        early_stop=False,
    )
