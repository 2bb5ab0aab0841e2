"""Gradient buckets: a step's data-parallel reductions, launched as soon as gradients are final.

A bucket is a run of parameters of one gradient family (data_parallel.py) whose gradients live
in one contiguous buffer (each gradient a view of it, as in Megatron-Core) and go through one
collective on the family's reduction group, in place: an all-reduce (ReplicatedAdamW) or a
reduce-scatter onto this rank's slice of the buffer, its share of the master gradient
(ShardedAdamW, ZeRO-1). The buffers live for the whole run and are zeroed after each step, so
gradients cost their 4 (or 2) bytes per parameter once and the reduction copies nothing.

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
moefold/parallel/compressed_reduce.py: launch quantises the buffer and starts its all-to-all
(async), wait finishes it (the all-gather of the re-quantised sums, or for ZeRO-1 nothing
more) and writes the sum back into the buffer.

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

from moefold.parallel.mesh import ParallelGroups
from moefold.parallel.mixed_precision import grad_dtype, set_grad


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


def stats_family(group_name: str) -> str:
    """The CommStats family a reduction group's traffic counts under."""
    return "edp" if group_name == "edp" else "dp"


def one_dtype(dtypes: set[torch.dtype], what: str) -> torch.dtype:
    if len(dtypes) != 1:
        raise ValueError(f"one {what} buffer holds one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def runs_of(buffer: torch.Tensor, params: list[nn.Parameter]):
    """Each parameter with its run of `buffer` (back to back, in order), shaped like it."""
    offset = 0
    for param in params:
        yield param, buffer[offset : offset + param.numel()].view_as(param)
        offset += param.numel()


def rank_slice(flat: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s 1/size of a flat buffer padded to a multiple of `size` (a view)."""
    return flat.view(size, -1)[rank]


def bind_grad_buffer(params: list[nn.Parameter], numel: int) -> torch.Tensor:
    """One zeroed buffer of `numel` elements holding the parameters' gradients back to back
    (zero padding after them), each gradient a view of its run: backward accumulates into it
    in place (autograd adds into an existing .grad; the fp32 main-gradient hook adds into
    `main_grad`), so the bucket's collective runs on it with no flat copy. Megatron-Core's
    contiguous gradient buffer; written here because DDP's `gradient_as_bucket_view` is tied
    to its own all-reduce and cannot reduce-scatter (ZeRO-1) or reduce over our families."""
    dtype = one_dtype({grad_dtype(p) for p in params}, "gradient")
    buffer = torch.zeros(numel, dtype=dtype, device=params[0].device)
    for param, run in runs_of(buffer, params):
        set_grad(param, run)
    return buffer


class AllReduceBucket:
    """Gradients summed over a family's group by one all-reduce (or, with a `compressor`,
    its ByteGrad sum) in place in the bucket's gradient buffer, of which every parameter's
    gradient is a view."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group_name: str,
        groups: ParallelGroups,
        compressor=None,
    ):
        self.params, self.family = params, stats_family(group_name)
        self.group, self.size = groups.group(group_name), groups.size(group_name)
        self.stats, self.compressor = groups.comm_stats, compressor
        self.grad_data = bind_grad_buffer(params, sum(p.numel() for p in params))
        self.work = self.pending = None

    def launch(self) -> None:
        if self.compressor is not None:  # in flight: 1-byte codes
            self.pending = self.compressor.start(self.grad_data.float())
            return
        self.stats.add_all_reduce(self.family, self.grad_data, self.size)
        self.work = dist.all_reduce(self.grad_data, group=self.group, async_op=True)

    def wait(self) -> None:
        if self.pending is not None:
            self.grad_data.copy_(self.compressor.all_reduce(self.pending))
            self.pending = None
        else:
            assert self.work is not None, "wait() before launch()"
            self.work.wait()
        self.work = None


class ReduceScatterBucket:
    """Gradients summed over a family's group and scattered in place: the bucket's gradient
    buffer is padded to a multiple of n, and this rank's 1/n slice of it (`local`, its share
    of the master gradient) receives the sum; the rest of the buffer is stale until zeroed."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group_name: str,
        groups: ParallelGroups,
        shard_numel: int,
        compressor=None,
    ):
        self.params, self.family = params, stats_family(group_name)
        self.group, self.size = groups.group(group_name), groups.size(group_name)
        self.stats, self.compressor = groups.comm_stats, compressor
        self.grad_data = bind_grad_buffer(params, shard_numel * self.size)
        self.local = rank_slice(self.grad_data, dist.get_rank(self.group), self.size)
        self.work = self.pending = None

    def launch(self) -> None:
        # fp32, or bf16 with train.grad_reduce_dtype = "bf16" (the optimizer upcasts `local`)
        if self.compressor is not None:
            self.pending = self.compressor.start(self.grad_data.float())
            return
        self.stats.add(
            self.family, (self.size - 1) * self.local.numel() * self.local.element_size()
        )
        self.work = dist.reduce_scatter_single(
            self.local, self.grad_data, group=self.group, async_op=True
        )

    def wait(self) -> None:
        if self.pending is not None:
            self.local.copy_(self.compressor.reduce_scatter(self.pending))
            self.pending = None
        if self.work is not None:
            self.work.wait()
        self.work = None


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
    def zero_grad(self) -> None:
        """Zero every bucket's gradient buffer (the gradients stay views of them)."""
        for bucket in self.buckets:
            bucket.grad_data.zero_()

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets not launched yet, in order, and wait for every collective."""
        for bucket in self.buckets[self._next :]:
            bucket.launch()
        for bucket in self.buckets:
            bucket.wait()
        self._reset()
