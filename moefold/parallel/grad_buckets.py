"""Gradient buckets: a step's data-parallel reductions, launched as soon as gradients are final.

A bucket is a run of parameters of one gradient family (data_parallel.py) whose gradients go
through one collective on the family's reduction group: an all-reduce (ReplicatedAdamW) or a
reduce-scatter onto this rank's slice of the fp32 master gradient (ShardedAdamW, ZeRO-1).

Without overlap each family (ZeRO-1: each (family, weight decay) group) is one bucket, and
`GradReducer.finish` reduces them all after backward. With `parallel.overlap_grad_reduce`,
buckets hold about `parallel.grad_bucket_mb` each, filled in reverse registration order (about
the order in which backward finishes gradients). A post-accumulate-grad hook on every
parameter counts its gradient's accumulations: the `backwards_per_step`-th (this rank's
micro-batches; every pipeline stage runs one backward per micro-batch, whatever the schedule
and however many virtual stages) leaves it final, and once all of a bucket's gradients are
final its collective is launched with async_op=True while backward goes on. Earlier
micro-batches never reduce. `finish` launches what the hooks did not (a gradient that never
arrived is reduced as zeros, so every rank issues the same collectives) and waits for all.

With `parallel.grad_compression = "bytegrad"` a bucket's collective is the compressed sum of
moefold/parallel/compressed_reduce.py: launch quantises and starts its all-to-all (async),
wait finishes it (the all-gather of the re-quantised sums, or for ZeRO-1 nothing more).

Order: collectives on one process group must be issued in the same order on every rank, and
families can share a group (all are WORLD at dp = world size), so buckets launch strictly in
planned order; a ready bucket waits for the earlier ones. Hooks run in the autograd engine's
order, which is the same on every rank (same graph), so launches also interleave the same way
with backward's own collectives (ep all-to-all, tp reduce-scatter) where those share a group.
The hooks are installed here, next to the only collectives they launch.
"""

from __future__ import annotations

from collections.abc import Hashable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moefold.parallel.mesh import ParallelGroups
from moefold.parallel.mixed_precision import grad_dtype, grad_of, set_grad


def plan_buckets(nbytes: list[int], keys: list[Hashable], cap_bytes: float) -> list[list[int]]:
    """Group parameter indices 0..n-1 into buckets that each hold a single key.

    Walks the parameters backwards keeping one open bucket per key; a bucket closes once it
    holds `cap_bytes` or more (a larger parameter fills one alone). Returns the buckets in
    closing order, then the still-open ones in the order their keys first came up; with
    `cap_bytes = inf` that is one bucket per key.
    """
    open_buckets: dict[Hashable, list[int]] = {}
    filled: dict[Hashable, int] = {}
    closed = []
    for index in reversed(range(len(nbytes))):
        key = keys[index]
        open_buckets.setdefault(key, []).append(index)
        filled[key] = filled.get(key, 0) + nbytes[index]
        if filled[key] >= cap_bytes:
            closed.append(open_buckets.pop(key))
            filled[key] = 0
    return closed + list(open_buckets.values())


def _stats_family(group_name: str) -> str:
    return "edp" if group_name == "edp" else "dp"


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    out = []
    for p in params:  # fp32 main gradients under bf16 mixed precision (mixed_precision.py)
        grad = grad_of(p)
        out.append(grad if grad is not None else torch.zeros_like(p, dtype=grad_dtype(p)))
    return out


class AllReduceBucket:
    """Gradients summed over a family's group in one flat all-reduce (or, with a
    `compressor`, its ByteGrad sum). The buffer holds the only copy while in flight;
    afterwards each parameter's .grad is a view of it."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group_name: str,
        groups: ParallelGroups,
        compressor=None,
    ):
        self.params, self.family = params, _stats_family(group_name)
        self.group, self.size = groups.group(group_name), groups.size(group_name)
        self.stats, self.compressor = groups.comm_stats, compressor
        self.flat: torch.Tensor | None = None
        self.work = self.pending = None

    def launch(self) -> None:
        self.flat = _flatten_dense_tensors(_grads(self.params))
        for param in self.params:
            set_grad(param, None)
        if self.compressor is not None:  # in flight: 1-byte codes; the fp32 copy is dropped
            self.dtype, self.pending = self.flat.dtype, self.compressor.start(self.flat.float())
            self.flat = None
            return
        self.stats.add_all_reduce(self.family, self.flat, self.size)
        self.work = dist.all_reduce(self.flat, group=self.group, async_op=True)

    def wait(self) -> None:
        if self.pending is not None:
            self.flat = self.compressor.all_reduce(self.pending).to(self.dtype)
            self.pending = None
        else:
            assert self.work is not None, "wait() before launch()"
            self.work.wait()
        for param, grad in zip(self.params, _unflatten_dense_tensors(self.flat, self.params)):
            set_grad(param, grad)
        self.flat = self.work = None


class ReduceScatterBucket:
    """Gradients summed over a family's group and scattered: this rank receives `out`, its
    1/n slice of the bucket (padded to a multiple of n), a view of its master gradient. The
    parameters' own gradients are freed at launch."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group_name: str,
        groups: ParallelGroups,
        out: torch.Tensor,
        compressor=None,
    ):
        self.params, self.family, self.out = params, _stats_family(group_name), out
        self.group, self.size = groups.group(group_name), groups.size(group_name)
        self.stats, self.compressor = groups.comm_stats, compressor
        self.flat: torch.Tensor | None = None
        self.wire: torch.Tensor | None = None
        self.work = self.pending = None

    def launch(self) -> None:
        # fp32, or bf16 with train.grad_reduce_dtype = "bf16" (received into `wire`, then
        # upcast into the master gradient on wait)
        flat = padded_flat(_grads(self.params), self.out.numel() * self.size)
        for param in self.params:  # their sum now lives in the master gradient
            set_grad(param, None)
        if self.size == 1:
            self.out.copy_(flat)
            return
        if self.compressor is not None:
            self.pending = self.compressor.start(flat.float())
            return
        wire = (
            self.out
            if flat.dtype == self.out.dtype
            else self.out.new_empty(self.out.shape, dtype=flat.dtype)
        )
        self.stats.add(self.family, (self.size - 1) * wire.numel() * wire.element_size())
        self.flat, self.wire = flat, wire  # kept alive until the collective is done
        self.work = dist.reduce_scatter_tensor(wire, flat, group=self.group, async_op=True)

    def wait(self) -> None:
        if self.pending is not None:
            self.out.copy_(self.compressor.reduce_scatter(self.pending))
            self.pending = None
        if self.work is not None:
            self.work.wait()
            if self.wire is not self.out:
                self.out.copy_(self.wire)
        self.flat = self.work = self.wire = None


def padded_flat(tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
    """The tensors flattened into one 1-D tensor, zero-padded to `numel` elements: one
    allocation (a cat and then a pad would hold two copies of the bucket at once)."""
    if not tensors:
        return torch.zeros(numel)
    used = sum(t.numel() for t in tensors)
    flat = tensors[0].new_empty(numel)
    torch.cat([t.reshape(-1) for t in tensors], out=flat[:used])
    flat[used:].zero_()
    return flat


class GradReducer:
    """Runs the buckets' collectives once per step, in bucket order: from backward hooks when
    `overlap` is set, otherwise (and for whatever the hooks left) in `finish`."""

    def __init__(self, buckets: list, overlap: bool, backwards_per_step: int) -> None:
        self.buckets, self.backwards_per_step = buckets, backwards_per_step
        if overlap:
            for index, bucket in enumerate(buckets):
                for position, param in enumerate(bucket.params):
                    param.register_post_accumulate_grad_hook(
                        partial(self._on_grad_accumulated, index, position)
                    )
        self._reset()

    def _reset(self) -> None:
        self._counts = [[0] * len(bucket.params) for bucket in self.buckets]
        self._waiting = [len(bucket.params) for bucket in self.buckets]
        self._next = 0

    @property
    def launched(self) -> int:
        """Buckets launched so far in this step (by hooks, until `finish`)."""
        return self._next

    def _on_grad_accumulated(self, index: int, position: int, param: nn.Parameter) -> None:
        counts = self._counts[index]
        counts[position] += 1
        if counts[position] > self.backwards_per_step:
            raise RuntimeError(
                f"a parameter got more than {self.backwards_per_step} gradients in one step: "
                "its bucket was already reduced; call finish() after each step's backwards"
            )
        if counts[position] == self.backwards_per_step:
            self._waiting[index] -= 1
            while self._next < len(self.buckets) and self._waiting[self._next] == 0:
                self.buckets[self._next].launch()
                self._next += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets not launched yet, in order, and wait for every collective."""
        for bucket in self.buckets[self._next :]:
            bucket.launch()
        for bucket in self.buckets:
            bucket.wait()
        self._reset()
