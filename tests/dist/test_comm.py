"""Each collective in parallel/comm.py against its local formula, and the run_ranks harness.

Every rank builds the inputs of ALL ranks from seeded generators, runs the collective on its
own part, and compares output, input gradient and byte count with a single-process reference
computed on the full tensors. float64 throughout; pure data movement is compared exactly,
results of a sum over ranks with assert_close (the backend may sum in another order).
"""

import multiprocessing
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from moefold.parallel import comm
from moefold.parallel.comm import CommStats
from moefold.testing import dist as dist_harness
from moefold.testing.dist import RanksFailed, RanksTimedOut, run_ranks

pytestmark = pytest.mark.dist

F64 = 8  # bytes per float64 / int64 element


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _expect_only(stats: CommStats, family: str, nbytes: int) -> None:
    expected = dict.fromkeys(comm.FAMILIES, 0) | {family: nbytes}
    assert stats.as_dict() == expected, (stats.as_dict(), expected)


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in tensors]


# --- all_to_all -------------------------------------------------------------------------


def _split_matrix(n: int) -> list[list[int]]:
    """rows[src][dst]; rank 0 sends nothing and rank n-1 receives nothing (zero splits)."""
    counts = torch.randint(0, 4, (n, n), generator=torch.Generator().manual_seed(n))
    counts[0, :] = 0
    counts[:, n - 1] = 0
    counts[n - 1, 0] = 3  # keep at least one row moving
    return counts.tolist()


def _check_all_to_all(rank: int, n: int) -> None:
    rows, D = _split_matrix(n), 3
    xs = [_randn(10 + src, sum(rows[src]), D) for src in range(n)]
    ws = [_randn(20 + dst, sum(rows[s][dst] for s in range(n)), D) for dst in range(n)]

    ref_xs = _leaves(xs)
    ref_outs = []
    for dst in range(n):
        blocks = [x.split(rows[src])[dst] for src, x in enumerate(ref_xs)]
        ref_outs.append(torch.cat(blocks))
    sum((o * w).sum() for o, w in zip(ref_outs, ws, strict=True)).backward()

    stats = CommStats()
    x = xs[rank].clone().requires_grad_()
    output_splits = [rows[src][rank] for src in range(n)]
    out = comm.all_to_all(x, output_splits, rows[rank], dist.group.WORLD, family="ep", stats=stats)
    assert torch.equal(out, ref_outs[rank].detach())
    sent_fwd = (sum(rows[rank]) - rows[rank][rank]) * D * F64
    _expect_only(stats, "ep", sent_fwd)

    (out * ws[rank]).sum().backward()
    assert torch.equal(x.grad, ref_xs[rank].grad)
    sent_bwd = (sum(output_splits) - rows[rank][rank]) * D * F64
    _expect_only(stats, "ep", sent_fwd + sent_bwd)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_all_to_all_uneven_with_zero_splits_matches_local(world_size):
    run_ranks(_check_all_to_all, world_size)


def _check_counts_then_tokens(rank: int, n: int) -> None:
    """The dispatcher pattern: exchange counts, derive splits, move rows tagged by origin."""
    e = 2
    gen = torch.Generator().manual_seed(3)
    counts = [torch.randint(0, 3, (n * e,), generator=gen) for _ in range(n)]
    stats = CommStats()
    received = comm.exchange_counts(counts[rank], dist.group.WORLD, family="ep", stats=stats)
    expected = torch.stack([c[rank * e : (rank + 1) * e] for c in counts]).flatten()
    assert torch.equal(received, expected)
    _expect_only(stats, "ep", (n - 1) * e * F64)

    input_splits = counts[rank].view(n, e).sum(1).tolist()
    output_splits = received.view(n, e).sum(1).tolist()  # the one host sync of a dispatcher
    x = torch.full((sum(input_splits), 1), float(rank), dtype=torch.float64)
    out = comm.all_to_all(x, output_splits, input_splits, dist.group.WORLD, family="ep")
    origin = torch.repeat_interleave(torch.arange(n), torch.tensor(output_splits))
    assert torch.equal(out.flatten(), origin.double())


@pytest.mark.parametrize("world_size", [2, 4])
def test_exchange_counts_gives_the_all_to_all_splits(world_size):
    run_ranks(_check_counts_then_tokens, world_size)


# --- all_gather_dim / reduce_scatter_dim --------------------------------------------------


def _shape(dim: int, size: int) -> list[int]:
    shape = [2, 3, 4]
    shape[dim] = size
    return shape


def _uneven_sizes(n: int) -> list[int]:
    return [0 if r == 1 else r + 1 for r in range(n)]  # rank 1 contributes nothing


def _check_all_gather_dim(rank: int, n: int, dim: int, uneven: bool) -> None:
    sizes = _uneven_sizes(n) if uneven else [2] * n
    xs = [_randn(30 + r, *_shape(dim, sizes[r])) for r in range(n)]
    ws = [_randn(40 + r, *_shape(dim, sum(sizes))) for r in range(n)]
    ref_xs = _leaves(xs)
    ref_out = torch.cat(ref_xs, dim)
    sum((ref_out * w).sum() for w in ws).backward()  # every rank computes on all of it

    stats = CommStats()
    group = dist.group.WORLD
    gathered_sizes = None
    if uneven:
        gathered_sizes = comm.all_gather_sizes(sizes[rank], group, family="other", stats=stats)
        assert gathered_sizes == sizes
        assert stats.as_dict()["other"] == (n - 1) * F64
        stats.reset()
    x = xs[rank].clone().requires_grad_()
    out = comm.all_gather_dim(x, dim, group, sizes=gathered_sizes, family="tp", stats=stats)
    assert torch.equal(out, ref_out.detach())
    _expect_only(stats, "tp", (n - 1) * _nbytes(x))

    (out * ws[rank]).sum().backward()
    torch.testing.assert_close(x.grad, ref_xs[rank].grad)
    _expect_only(stats, "tp", (n - 1) * _nbytes(x) + _nbytes(out) - _nbytes(x))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dim", [0, 1, -1], ids=["dim0", "dim1", "dim-1"])
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_all_gather_dim_matches_local(world_size, dim, uneven):
    run_ranks(_check_all_gather_dim, world_size, dim, uneven)


def _check_reduce_scatter_dim(rank: int, n: int, dim: int, uneven: bool) -> None:
    sizes = _uneven_sizes(n) if uneven else [2] * n
    xs = [_randn(50 + r, *_shape(dim, sum(sizes))) for r in range(n)]
    ws = [_randn(60 + r, *_shape(dim, sizes[r])) for r in range(n)]
    ref_xs = _leaves(xs)
    ref_outs = torch.stack(ref_xs).sum(0).split(sizes, dim)
    sum((o * w).sum() for o, w in zip(ref_outs, ws, strict=True)).backward()

    stats = CommStats()
    x = xs[rank].clone().requires_grad_()
    out = comm.reduce_scatter_dim(
        x, dim, dist.group.WORLD, sizes=sizes if uneven else None, family="etp", stats=stats
    )
    torch.testing.assert_close(out, ref_outs[rank].detach())
    _expect_only(stats, "etp", _nbytes(x) - _nbytes(out))

    (out * ws[rank]).sum().backward()
    assert torch.equal(x.grad, ref_xs[rank].grad)
    _expect_only(stats, "etp", _nbytes(x) - _nbytes(out) + (n - 1) * _nbytes(out))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dim", [0, 2], ids=["dim0", "dim2"])
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_reduce_scatter_dim_matches_local(world_size, dim, uneven):
    run_ranks(_check_reduce_scatter_dim, world_size, dim, uneven)


def test_gather_and_reduce_scatter_at_8_ranks():
    def body(rank, n):
        _check_all_gather_dim(rank, n, 0, True)
        _check_reduce_scatter_dim(rank, n, 2, False)

    run_ranks(body, 8)


# --- region entry and exit ----------------------------------------------------------------


def _check_reduce_and_copy(rank: int, n: int) -> None:
    group, shape = dist.group.WORLD, (3, 5)
    all_reduce_bytes = F64 * (2 * (n - 1) * 15 // n)

    # reduce_from_region: partial sums in, replicated consumer (one shared weight) out.
    xs, w = [_randn(70 + r, *shape) for r in range(n)], _randn(80, *shape)
    stats = CommStats()
    x = xs[rank].clone().requires_grad_()
    out = comm.reduce_from_region(x, group, family="tp", stats=stats)
    torch.testing.assert_close(out, torch.stack(xs).sum(0))
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)  # d<sum_r x_r, w>/dx_r = w
    _expect_only(stats, "tp", all_reduce_bytes)

    # copy_to_region: replicated input, each rank computes its own part of the objective.
    x_full, ws = _randn(90, *shape), [_randn(100 + r, *shape) for r in range(n)]
    stats = CommStats()
    x = x_full.clone().requires_grad_()
    out = comm.copy_to_region(x, group, family="cp", stats=stats)
    assert torch.equal(out, x_full)
    _expect_only(stats, "cp", 0)
    (out * ws[rank]).sum().backward()
    torch.testing.assert_close(x.grad, torch.stack(ws).sum(0))
    _expect_only(stats, "cp", all_reduce_bytes)

    # all_reduce_sum_: in place, no autograd.
    stats = CommStats()
    y = xs[rank].clone()
    assert comm.all_reduce_sum_(y, group, family="dp", stats=stats) is y
    torch.testing.assert_close(y, torch.stack(xs).sum(0))
    _expect_only(stats, "dp", all_reduce_bytes)
    stats.add_all_reduce("edp", y, n)
    assert stats.as_dict()["edp"] == all_reduce_bytes


@pytest.mark.parametrize("world_size", [2, 4])
def test_reduce_from_and_copy_to_region_match_local(world_size):
    run_ranks(_check_reduce_and_copy, world_size)


def _check_scatter_and_gather_region(rank: int, n: int, dim: int, uneven: bool) -> None:
    group = dist.group.WORLD
    sizes = _uneven_sizes(n) if uneven else [2] * n
    arg_sizes = sizes if uneven else None

    # scatter_to_region: replicated input, each rank's slice feeds its own computation.
    x_full = _randn(110, *_shape(dim, sum(sizes)))
    ws = [_randn(120 + r, *_shape(dim, sizes[r])) for r in range(n)]
    stats = CommStats()
    x = x_full.clone().requires_grad_()
    out = comm.scatter_to_region(x, dim, group, sizes=arg_sizes, family="tp", stats=stats)
    assert torch.equal(out, x_full.split(sizes, dim)[rank])
    _expect_only(stats, "tp", 0)
    (out * ws[rank]).sum().backward()
    assert torch.equal(x.grad, torch.cat(ws, dim))
    _expect_only(stats, "tp", (n - 1) * _nbytes(out))

    # gather_from_region: shards in, replicated consumer (one shared weight) out.
    xs = [_randn(130 + r, *_shape(dim, sizes[r])) for r in range(n)]
    w = _randn(140, *_shape(dim, sum(sizes)))
    stats = CommStats()
    x = xs[rank].clone().requires_grad_()
    out = comm.gather_from_region(x, dim, group, sizes=arg_sizes, family="tp", stats=stats)
    assert torch.equal(out, torch.cat(xs, dim))
    _expect_only(stats, "tp", (n - 1) * _nbytes(x))
    (out * w).sum().backward()
    assert torch.equal(x.grad, w.split(sizes, dim)[rank])
    _expect_only(stats, "tp", (n - 1) * _nbytes(x))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dim", [0, 1], ids=["dim0", "dim1"])
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_scatter_to_and_gather_from_region_match_local(world_size, dim, uneven):
    run_ranks(_check_scatter_and_gather_region, world_size, dim, uneven)


# --- group of size 1 ----------------------------------------------------------------------


def _no_communication(*args, **kwargs):
    raise AssertionError("a collective was called on a group of size 1")


def _check_size_one_fast_path(rank: int, n: int) -> None:
    groups = [dist.new_group([r]) for r in range(n)]  # every rank creates every group
    group = groups[rank] if n > 1 else dist.group.WORLD
    stats = CommStats()
    x = _randn(150, 4, 3).requires_grad_()
    collectives = ["all_to_all_single", "all_gather_single", "reduce_scatter_single", "all_reduce"]
    with mock.patch.multiple(dist, **dict.fromkeys(collectives, _no_communication)):
        outs = [
            comm.all_to_all(x, [4], [4], group, family="ep", stats=stats),
            comm.all_gather_dim(x, 1, group, sizes=[3], family="tp", stats=stats),
            comm.reduce_scatter_dim(x, 0, group, family="tp", stats=stats),
            comm.reduce_from_region(x, group, family="tp", stats=stats),
            comm.copy_to_region(x, group, family="tp", stats=stats),
            comm.scatter_to_region(x, 0, group, family="cp", stats=stats),
            comm.gather_from_region(x, -1, group, family="cp", stats=stats),
        ]
        sum(o.sum() for o in outs).backward()
        counts = torch.arange(4)
        assert comm.exchange_counts(counts, group, family="ep", stats=stats) is counts
        assert comm.all_gather_sizes(7, group, family="other", stats=stats) == [7]
        assert comm.all_reduce_sum_(counts, group, family="dp", stats=stats) is counts
        with pytest.raises(ValueError, match="family must be one of"):
            comm.reduce_from_region(x, group, family="tensor")
        with pytest.raises(ValueError, match="input_splits"):
            comm.all_to_all(x, [4], [3], group, family="ep")
    assert all(o is x for o in outs)
    assert torch.equal(x.grad, torch.full_like(x, len(outs)))
    assert stats.as_dict() == dict.fromkeys(comm.FAMILIES, 0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_group_of_size_one_returns_input_without_communicating(world_size):
    run_ranks(_check_size_one_fast_path, world_size)


def test_comm_stats_families_reset_and_copy():
    stats = CommStats()
    stats.add("pp", 12)
    stats.add("pp", 4)
    snapshot = stats.as_dict()
    assert snapshot == dict.fromkeys(comm.FAMILIES, 0) | {"pp": 16}
    snapshot["pp"] = 0
    assert stats.as_dict()["pp"] == 16
    stats.reset()
    assert stats.as_dict() == dict.fromkeys(comm.FAMILIES, 0)
    with pytest.raises(ValueError, match="family"):
        stats.add("expert", 1)


# --- run_ranks --------------------------------------------------------------------------


def _report_setup(rank: int, n: int, tag: str, *, scale: int) -> tuple:
    a = torch.randn(256, 256, requires_grad=True)
    (a @ a).sum().backward()  # an intra-op kernel after the parent used its thread pool
    flags = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    return (rank, n, tag, scale * rank, dist.get_world_size(), *flags)


def test_run_ranks_returns_results_in_rank_order():
    a = torch.randn(1024, 1024)
    a @ a  # parent uses its OpenMP pool before forking (the deadlock case)
    results = run_ranks(_report_setup, 3, "tag", scale=10, timeout=30)
    assert results == [(r, 3, "tag", 10 * r, 3, 1, True) for r in range(3)]


def _return_tensors(rank: int, n: int, numel: int) -> torch.Tensor:
    return torch.full((numel,), float(rank))


def test_run_ranks_returns_tensors_by_value_after_the_ranks_exit(monkeypatch):
    collect = dist_harness._collect

    def collect_after_exit(procs, *args):
        for proc in procs:  # every rank has exited before the parent reads anything
            proc.join(10)
        return collect(procs, *args)

    monkeypatch.setattr(dist_harness, "_collect", collect_after_exit)
    results = run_ranks(_return_tensors, 2, 4, timeout=30)
    assert [t.tolist() for t in results] == [[0.0] * 4, [1.0] * 4]


def test_run_ranks_returns_results_larger_than_a_pipe_buffer():
    results = run_ranks(_return_tensors, 2, 1 << 18, timeout=30)  # 1 MiB each
    assert all(torch.equal(t, torch.full((1 << 18,), float(r))) for r, t in enumerate(results))


def _rank_one_fails(rank: int, n: int) -> None:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    dist.all_reduce(torch.ones(2))  # the others block on rank 1 until it leaves


def test_run_ranks_reports_the_failing_rank_first():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_rank_one_fails, 4, timeout=30)
    error = info.value
    assert not isinstance(error, RanksTimedOut)  # reported at once, not after the timeout
    assert next(iter(error.failures)) == 1
    assert "ValueError: rank one fails on purpose" in error.failures[1]
    assert "_rank_one_fails" in error.failures[1]
    assert "rank 1 failed" in str(error)
    assert set(error.failures) | set(error.hung) == {0, 1, 2, 3}


def _rank_two_dies(rank: int, n: int) -> int:
    # The barrier first: dying while the others still connect their gloo mesh made them fail
    # in init_process_group too (about 1 run in 15), which is a different report.
    dist.barrier()
    if rank == 2:
        os._exit(3)
    return rank


def test_run_ranks_reports_a_dead_rank():
    with pytest.raises(RanksFailed) as info:
        run_ranks(_rank_two_dies, 3, timeout=30)
    assert list(info.value.failures) == [2]
    assert "exited with code 3" in info.value.failures[2]


def _deadlock(rank: int, n: int, pid_dir: str) -> None:
    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    dist.recv(torch.zeros(1), src=1 - rank)  # both ranks wait for the other: a real hang


def test_run_ranks_turns_a_hang_into_a_timeout_and_reaps_children(tmp_path):
    with pytest.raises(RanksTimedOut) as info:
        run_ranks(_deadlock, 2, str(tmp_path), timeout=1.5)
    assert sorted(info.value.hung) == [0, 1]
    assert all("_deadlock" in stack for stack in info.value.hung.values())  # where it hung
    assert "did not finish within the 1.5 s timeout" in str(info.value)
    assert multiprocessing.active_children() == []
    for pid_file in tmp_path.glob("*.pid"):
        with pytest.raises(ProcessLookupError):  # killed and reaped, not a zombie
            os.kill(int(pid_file.read_text()), 0)
