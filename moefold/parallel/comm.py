"""Autograd-aware collectives on an explicit process group, with per-family byte accounting.

Every function takes the `group` it communicates on and a `family` naming the parallel axis the
call belongs to (one of FAMILIES). A group of size 1 never communicates: the call returns its
input (or a view or slice of it) and records nothing. Arguments are validated the same way at
every group size, so a mistake shows up in a 1-rank run too.

Shape legend: n group size, r this rank's index in the group, N rows along dim 0 of `x`,
E experts in the group (E = n * e), e local experts.

Byte accounting. `CommStats` counts the bytes THIS rank sends to OTHER ranks, in the forward and
in the backward, under the schedule that moves the least data:
- all-to-all: the rows sent to peers, `row_bytes * sum(input_splits[j] for j != r)`; the
  block a rank keeps for itself is a local copy and is free.
- all-gather: `(n - 1) * bytes(own input)`; each peer receives our block once. With even sizes
  this is `(n - 1) / n * bytes(output)`, the per-rank volume of a ring all-gather.
- reduce-scatter: `bytes(input) - bytes(own output)`; each peer receives our partial of its
  block. With even sizes this is `(n - 1) / n * bytes(input)`, as in a ring.
- all-reduce: `element_size * (2 * (n - 1) * M // n)` for M elements, the bandwidth-optimal
  minimum `2 * (n - 1) / n * bytes` (a ring's reduce-scatter then all-gather). It is the same
  on every rank; when n does not divide M it is the ranks' average, rounded down to elements.
These are analytical counts of the data that must move, not measurements of what the backend's
algorithm actually does.

gloo needs contiguous tensors and `all_to_all_single` needs split sizes as lists of Python ints;
every function here passes contiguous tensors to the backend.

Calls that stay outside this module (tests/unit/test_comm_accounting.py holds the list to it):
- parallel/grad_buckets.py, parallel/optimizer.py: the asynchronous gradient all-reduce /
  reduce-scatter of a bucket and ZeRO-1's parameter all-gather; each records its bytes in the
  same CommStats where it launches, since these collectives return a work handle to wait on.
- parallel/data_parallel.py, parallel/optimizer.py (grad norm), train/trainer.py (step
  metrics): one or a few scalars a step, control traffic, not counted; likewise
  `all_ranks_agree` here (the non-finite verdict, a checkpoint's save phases).
- train/step_runner.py: pipeline send/recv run inside torch.distributed.pipelining; the runner
  counts them analytically under "pp" (one boundary tensor per micro-batch and direction).
- parallel/mesh.py, train/launch.py: barriers at start-up and tear-down, outside any step.
- plan/hardware.py, bench/, testing/: measuring the machine, benchmarks and test oracles.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

FAMILIES = ("tp", "cp", "dp", "ep", "etp", "edp", "pp", "other")


class CommStats:
    """Bytes this rank sent, per parallel family. Passed explicitly; there is no global one."""

    def __init__(self) -> None:
        self._bytes = dict.fromkeys(FAMILIES, 0)

    def add(self, family: str, nbytes: int) -> None:
        """Add `nbytes` sent bytes to `family` (one of FAMILIES)."""
        _check_family(family)
        self._bytes[family] += int(nbytes)

    def add_all_reduce(self, family: str, x: torch.Tensor, group_size: int) -> None:
        """Count one all-reduce of `x` over `group_size` ranks (module doc convention)."""
        self.add(family, _all_reduce_bytes(x, group_size))

    def reset(self) -> None:
        """Set every family back to zero."""
        self._bytes = dict.fromkeys(FAMILIES, 0)

    def as_dict(self) -> dict[str, int]:
        """A copy: family -> bytes sent, every family present."""
        return dict(self._bytes)


# --- public collectives -------------------------------------------------------------------


def all_to_all(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: ProcessGroup,
    *,
    family: str,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Exchange row blocks along dim 0: block j of `x` goes to rank j (splits may be 0).

    Forward: `x` [N, ...] with N = sum(input_splits) -> out [sum(output_splits), ...], the
    blocks received from ranks 0..n-1 in rank order. Backward: all-to-all of the gradient with
    the splits swapped. Communicates on `group` in both directions.

    Args:
        x: [N, ...] rows ordered by destination rank.
        output_splits: rows received from each rank, length n (a host-side list of ints).
        input_splits: rows sent to each rank, length n, summing to N.
        group: the group to exchange on, e.g. the ep group.
        family: accounting family, e.g. "ep".
        stats: optional byte accounting.
    """
    _check_family(family)
    n = group.size()
    _check_splits("output_splits", output_splits, n)
    _check_splits("input_splits", input_splits, n)
    if sum(input_splits) != x.size(0):
        raise ValueError(
            f"all_to_all: sum(input_splits)={sum(input_splits)} must equal x.size(0)={x.size(0)}"
        )
    if n == 1:
        if output_splits != input_splits:
            raise ValueError("all_to_all: a 1-rank group needs output_splits == input_splits")
        return x
    # Copies: the backward must see the splits of this call even if the caller reuses lists.
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group, family, stats)


def all_gather_dim(
    x: torch.Tensor,
    dim: int,
    group: ProcessGroup,
    *,
    sizes: list[int] | None = None,
    family: str,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, when each rank then computes on ALL of it.

    Forward: all-gather, out.size(dim) = sum of the ranks' sizes. Backward: reduce-scatter
    (sum): every rank's computation used our block, so its gradient is the sum over ranks.
    This is the token gather of the all-gather dispatcher. Compare gather_from_region, whose
    consumer is replicated and whose backward only slices. Communicates on `group` both ways.

    Args:
        x: [..., s_r, ...] with s_r at `dim`.
        dim: the tensor dim to gather along.
        group: the group to gather over.
        sizes: s_i of every rank in group order (uneven gather), or None when all are equal.
        family: accounting family.
        stats: optional byte accounting.
    """
    _check_family(family)
    dim = dim % x.dim()
    _check_sizes(sizes, x.size(dim), group, "all_gather_dim")
    sizes = None if sizes is None else list(sizes)  # kept for the backward
    if group.size() == 1:
        return x
    return _GatherReduceScatter.apply(x, dim, sizes, group, family, stats)


def reduce_scatter_dim(
    x: torch.Tensor,
    dim: int,
    group: ProcessGroup,
    *,
    sizes: list[int] | None = None,
    family: str,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Sum `x` over ranks and keep this rank's block along `dim`.

    Forward: reduce-scatter (sum); x.size(dim) = sum(sizes) (or n * out size when even).
    Backward: all-gather of the gradient blocks. This is the combine of the all-gather
    dispatcher and the sequence-parallel exit of a row-parallel layer. Communicates on `group`.

    Args:
        x: [..., M, ...], a partial sum on every rank, with M at `dim`.
        dim: the tensor dim to scatter along.
        group: the group to reduce over.
        sizes: output size of every rank in group order, or None for M / n each.
        family: accounting family.
        stats: optional byte accounting.
    """
    _check_family(family)
    dim = dim % x.dim()
    _check_total(sizes, x.size(dim), group, "reduce_scatter_dim")
    sizes = None if sizes is None else list(sizes)  # kept for the backward
    if group.size() == 1:
        return x
    return _ReduceScatterGather.apply(x, dim, sizes, group, family, stats)


def reduce_from_region(
    x: torch.Tensor, group: ProcessGroup, *, family: str, stats: CommStats | None = None
) -> torch.Tensor:
    """Exit a parallel region whose consumer is replicated: sum the partial results.

    Forward: all-reduce (sum) on `group`. Backward: identity, because every rank holds the same
    gradient of the replicated consumer (Megatron's reduce_from_tensor_model_parallel_region).

    Args:
        x: any shape, a partial sum on every rank.
        group: the group to reduce over, e.g. the tp group.
        family: accounting family.
        stats: optional byte accounting.
    """
    _check_family(family)
    if group.size() == 1:
        return x
    return _ReduceForward.apply(x, group, family, stats)


def copy_to_region(
    x: torch.Tensor, group: ProcessGroup, *, family: str, stats: CommStats | None = None
) -> torch.Tensor:
    """Enter a parallel region with a replicated input that every rank uses differently.

    Forward: identity. Backward: all-reduce (sum) on `group`, since each rank's computation
    contributes a part of the input's gradient (Megatron's copy_to_tensor_model_parallel_region).

    Args:
        x: any shape, identical on every rank of `group`.
        group: the group the region spans, e.g. the tp group.
        family: accounting family.
        stats: optional byte accounting.
    """
    _check_family(family)
    if group.size() == 1:
        return x
    return _ReduceBackward.apply(x, group, family, stats)


def scatter_to_region(
    x: torch.Tensor,
    dim: int,
    group: ProcessGroup,
    *,
    sizes: list[int] | None = None,
    family: str,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Enter a sharded region from a replicated tensor: keep this rank's block along `dim`.

    Forward: slice, no communication. Backward: all-gather of the gradient blocks on `group`
    (the replicated input's gradient is the concatenation). The sequence-parallel entry, and
    the MoE entry when tokens are replicated across tp.

    Args:
        x: [..., M, ...], identical on every rank, with M at `dim`.
        dim: the tensor dim to split.
        group: the group the region spans.
        sizes: block size of every rank in group order, or None for M / n each.
        family: accounting family.
        stats: optional byte accounting.
    """
    _check_family(family)
    dim = dim % x.dim()
    _check_total(sizes, x.size(dim), group, "scatter_to_region")
    sizes = None if sizes is None else list(sizes)  # kept for the backward
    if group.size() == 1:
        return x
    return _SliceGather.apply(x, dim, sizes, group, family, stats)


def gather_from_region(
    x: torch.Tensor,
    dim: int,
    group: ProcessGroup,
    *,
    sizes: list[int] | None = None,
    family: str,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Exit a sharded region into a replicated consumer: concatenate the blocks along `dim`.

    Forward: all-gather on `group`. Backward: keep this rank's block of the gradient, no
    communication (every rank holds the same gradient of the replicated consumer). Compare
    all_gather_dim, whose backward sums over ranks.

    Args:
        x: [..., s_r, ...] with s_r at `dim`.
        dim: the tensor dim to gather along.
        group: the group the region spans.
        sizes: s_i of every rank in group order, or None when all are equal.
        family: accounting family.
        stats: optional byte accounting.
    """
    _check_family(family)
    dim = dim % x.dim()
    _check_sizes(sizes, x.size(dim), group, "gather_from_region")
    sizes = None if sizes is None else list(sizes)  # kept for the backward
    if group.size() == 1:
        return x
    return _GatherSlice.apply(x, dim, sizes, group, family, stats)


def exchange_counts(
    tokens_per_expert: torch.Tensor,
    group: ProcessGroup,
    *,
    family: str,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """The count exchange of an all-to-all dispatcher (no autograd).

    Input `tokens_per_expert` [E] int64: rows this rank sends to each expert of the group,
    experts ordered by owning rank (rank j owns experts j*e .. j*e+e-1). Output [E] viewed as
    [n, e]: entry (s, i) is the number of rows rank s sends to our local expert i. Row sums
    of that view are the all_to_all output_splits; this function does not sync to the host.
    Communicates on `group` (all-to-all); returns the input itself when n == 1.
    """
    _check_family(family)
    n = group.size()
    if tokens_per_expert.dim() != 1 or tokens_per_expert.numel() % n != 0:
        raise ValueError(
            f"exchange_counts: tokens_per_expert must be 1-D with a multiple of the group size "
            f"({n}) entries, got shape {tuple(tokens_per_expert.shape)}"
        )
    if n == 1:
        return tokens_per_expert
    splits = [tokens_per_expert.numel() // n] * n
    return _all_to_all_rows(tokens_per_expert, splits, splits, group, family, stats)


def all_gather_sizes(
    size: int, group: ProcessGroup, *, family: str, stats: CommStats | None = None
) -> list[int]:
    """Every rank's `size` (a Python int) in group order: the `sizes` of an uneven gather.

    One all-gather of one int64 per rank on `group`, then a host-side list (a sync on devices).
    """
    _check_family(family)
    if group.size() == 1:
        return [int(size)]
    local = torch.tensor([size], dtype=torch.int64)
    return _gather_rows(local, None, group, family, stats).tolist()


@torch.no_grad()
def all_reduce_sum_(
    x: torch.Tensor, group: ProcessGroup, *, family: str, stats: CommStats | None = None
) -> torch.Tensor:
    """In-place sum over `group` without autograd (gradient reduction, metrics). Returns `x`.

    `x` must be contiguous (gloo); bytes are counted as for an all-reduce (module doc).
    """
    _check_family(family)
    if not x.is_contiguous():
        raise ValueError("all_reduce_sum_: x must be contiguous to be reduced in place")
    if group.size() > 1:
        dist.all_reduce(x, group=group)
        _record(stats, family, _all_reduce_bytes(x, group.size()))
    return x


def all_ranks_agree(ok: bool, group: ProcessGroup) -> bool:
    """Whether `ok` holds on every rank of `group`: one MIN all-reduce of a flag, so no rank
    goes on while another failed. Control traffic, not counted (module doc)."""
    flag = torch.tensor([1.0 if ok else 0.0])
    if group.size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag[0] > 0)


@torch.no_grad()
def all_to_all_blocks(
    x: torch.Tensor,
    group: ProcessGroup,
    *,
    family: str,
    stats: CommStats | None = None,
    async_op: bool = False,
) -> tuple[torch.Tensor, dist.Work | None]:
    """Equal blocks along dim 0 without autograd: block j of `x` [n * m, ...] goes to rank j.

    Returns (out [n * m, ...], the blocks received from ranks 0..n-1 in rank order; the
    collective's work handle when `async_op`, else None). `out` is only valid after wait().
    Any dtype gloo sends (uint8 for compressed gradients). Communicates on `group`.
    """
    _check_family(family)
    n = group.size()
    if x.size(0) % n != 0:
        raise ValueError(f"all_to_all_blocks: x.size(0)={x.size(0)} is not a multiple of {n}")
    if n == 1:
        return x, None
    x = x.contiguous()
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x, group=group, async_op=async_op)
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    _record(stats, family, row_bytes * (x.size(0) - x.size(0) // n))
    return out, work


@torch.no_grad()
def all_gather_blocks(
    x: torch.Tensor, group: ProcessGroup, *, family: str, stats: CommStats | None = None
) -> torch.Tensor:
    """[m, ...] -> [n * m, ...], every rank's block in rank order, without autograd."""
    _check_family(family)
    if group.size() == 1:
        return x
    return _gather_rows(x, None, group, family, stats)


# --- raw collectives on dim 0 (no autograd; record bytes) --------------------------------


def _all_to_all_rows(x, output_splits, input_splits, group, family, stats) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    rows_to_peers = sum(input_splits) - input_splits[group.rank()]
    _record(stats, family, row_bytes * rows_to_peers)
    return out


def _gather_rows(x, sizes, group, family, stats) -> torch.Tensor:
    """[s_r, ...] -> [sum(sizes), ...] (or [n * s_r, ...] when sizes is None)."""
    n = group.size()
    x = x.contiguous()
    if sizes is not None:
        # gloo's all-gather needs equal sizes; an all-to-all that sends our block to every
        # rank moves exactly the same bytes.
        repeated = x.repeat(n, *([1] * (x.dim() - 1)))
        return _all_to_all_rows(repeated, list(sizes), [x.size(0)] * n, group, family, stats)
    out = x.new_empty((n * x.size(0), *x.shape[1:]))
    dist.all_gather_single(out, x, group=group)
    _record(stats, family, (n - 1) * x.numel() * x.element_size())
    return out


def _reduce_scatter_rows(x, sizes, group, family, stats) -> torch.Tensor:
    """[M, ...] -> [sizes[r], ...] (or [M / n, ...] when sizes is None), summed over ranks."""
    n, r = group.size(), group.rank()
    x = x.contiguous()
    if sizes is not None:
        # Send block j to rank j, receive n partials of our block, sum them in rank order.
        own = sizes[r]
        parts = _all_to_all_rows(x, [own] * n, list(sizes), group, family, stats)
        return parts.view(n, own, *x.shape[1:]).sum(dim=0)
    out = x.new_empty((x.size(0) // n, *x.shape[1:]))
    dist.reduce_scatter_single(out, x, group=group)
    _record(stats, family, (x.numel() - out.numel()) * x.element_size())
    return out


def _all_reduce(x, group, family, stats) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    _record(stats, family, _all_reduce_bytes(out, group.size()))
    return out


def _all_reduce_bytes(x: torch.Tensor, group_size: int) -> int:
    if group_size == 1:
        return 0
    return x.element_size() * (2 * (group_size - 1) * x.numel() // group_size)


def _along(dim: int, fn, x: torch.Tensor, *args) -> torch.Tensor:
    """Apply a dim-0 collective `fn` to `x` along `dim` (move `dim` to the front and back)."""
    if dim == 0:
        return fn(x, *args)
    return fn(x.movedim(dim, 0), *args).movedim(0, dim).contiguous()


def _block(x: torch.Tensor, dim: int, sizes: list[int] | None, group: ProcessGroup):
    """This rank's block of `x` along `dim` (a view)."""
    r = group.rank()
    if sizes is None:
        own = x.size(dim) // group.size()
        return x.narrow(dim, r * own, own)
    return x.narrow(dim, sum(sizes[:r]), sizes[r])


# --- autograd functions -------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, family, stats):
        ctx.args = (output_splits, input_splits, group, family, stats)
        return _all_to_all_rows(x, output_splits, input_splits, group, family, stats)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits, group, family, stats = ctx.args
        grad_x = _all_to_all_rows(grad, input_splits, output_splits, group, family, stats)
        return grad_x, None, None, None, None, None


class _GatherReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group, family, stats):
        ctx.args = (dim, sizes, group, family, stats)
        return _along(dim, _gather_rows, x, sizes, group, family, stats)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group, family, stats = ctx.args
        grad_x = _along(dim, _reduce_scatter_rows, grad, sizes, group, family, stats)
        return grad_x, None, None, None, None, None


class _ReduceScatterGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group, family, stats):
        ctx.args = (dim, sizes, group, family, stats)
        return _along(dim, _reduce_scatter_rows, x, sizes, group, family, stats)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group, family, stats = ctx.args
        grad_x = _along(dim, _gather_rows, grad, sizes, group, family, stats)
        return grad_x, None, None, None, None, None


class _ReduceForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, family, stats):
        return _all_reduce(x, group, family, stats)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


class _ReduceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, family, stats):
        ctx.args = (group, family, stats)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        group, family, stats = ctx.args
        return _all_reduce(grad, group, family, stats), None, None, None


class _SliceGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group, family, stats):
        ctx.args = (dim, sizes, group, family, stats)
        return _block(x, dim, sizes, group).contiguous()

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group, family, stats = ctx.args
        grad_x = _along(dim, _gather_rows, grad, sizes, group, family, stats)
        return grad_x, None, None, None, None, None


class _GatherSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group, family, stats):
        ctx.args = (dim, sizes, group)
        return _along(dim, _gather_rows, x, sizes, group, family, stats)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group = ctx.args
        return _block(grad, dim, sizes, group).contiguous(), None, None, None, None, None


# --- validation and accounting ------------------------------------------------------------


def _record(stats: CommStats | None, family: str, nbytes: int) -> None:
    if stats is not None:
        stats.add(family, nbytes)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _is_size_list(sizes, n: int) -> bool:
    return len(sizes) == n and all(isinstance(s, int) and s >= 0 for s in sizes)


def _check_splits(name: str, splits: list[int], n: int) -> None:
    if not _is_size_list(splits, n):
        raise ValueError(
            f"all_to_all: {name} must be a list of {n} non-negative Python ints (one per rank "
            f"of the group), got {splits!r}; turn count tensors into lists with .tolist()"
        )


def _check_sizes(sizes, local_size: int, group: ProcessGroup, name: str) -> None:
    """For gathers: sizes has one entry per rank and our own entry matches our input."""
    if sizes is None:
        return
    n, r = group.size(), group.rank()
    if not _is_size_list(sizes, n) or sizes[r] != local_size:
        raise ValueError(
            f"{name}: sizes must list every rank's size along dim ({n} ints) with "
            f"sizes[{r}] == {local_size} for this rank, got {sizes!r}"
        )


def _check_total(sizes, total: int, group: ProcessGroup, name: str) -> None:
    """For scatters: sizes add up to the input size, or the input splits evenly."""
    n = group.size()
    if sizes is None and total % n != 0:
        raise ValueError(
            f"{name}: size {total} along dim does not divide by the group size {n}; "
            f"pass sizes= for an uneven split"
        )
    if sizes is not None and (not _is_size_list(sizes, n) or sum(sizes) != total):
        raise ValueError(
            f"{name}: sizes must be {n} ints summing to the size along dim ({total}), got {sizes!r}"
        )
