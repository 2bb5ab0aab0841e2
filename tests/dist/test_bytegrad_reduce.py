"""ByteGrad's compressed sum on real gloo ranks (moefold/parallel/compressed_reduce.py): equal
to the single-process reference bit for bit, within two quantisation steps of the exact sum,
identical on every rank, flat or hierarchical, with the bytes it sends counted in CommStats."""

import pytest
import torch

from moefold.config import ParallelConfig
from moefold.parallel.bytegrad import HEADER_BYTES, reference_sum
from moefold.parallel.compressed_reduce import build_grad_compressors
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks

pytestmark = pytest.mark.dist

NUMEL = 1001  # not a multiple of the group size: the last chunk is padded


def _inputs(world_size: int) -> list[torch.Tensor]:
    """Every rank's gradient, with ranges that differ by rank (a rank-dependent offset)."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(NUMEL, generator=gen) * (r + 1) + r for r in range(world_size)]


def _body(rank, world_size, node_size: int):
    groups = build_parallel_groups(ParallelLayout.from_config(ParallelConfig(), world_size))
    compressor = build_grad_compressors(groups, ["dp_cp"], node_size)["dp_cp"]
    xs = _inputs(world_size)
    groups.comm_stats.reset()
    summed = compressor.all_reduce(compressor.start(xs[rank]))
    all_reduce_bytes = groups.comm_stats.as_dict()
    groups.comm_stats.reset()
    padded = torch.nn.functional.pad(xs[rank], (0, -NUMEL % world_size))
    scattered = compressor.reduce_scatter(compressor.start(padded))
    scatter_bytes = groups.comm_stats.as_dict()
    groups.comm_stats.reset()
    bf16 = compressor.all_reduce(compressor.start(xs[rank].bfloat16()))
    assert bf16.dtype == torch.float32  # the sum of dequantised values, cast by the caller
    all_reduce_bytes["dp_bf16"] = groups.comm_stats.as_dict()["dp"]
    return summed, all_reduce_bytes, scattered, scatter_bytes


def _step(x: torch.Tensor) -> float:
    return (x.max() - x.min()).item() / 255


def test_bytegrad_sum_matches_reference_and_is_identical_on_every_rank():
    world_size = 4
    results = run_ranks(_body, world_size, 0, timeout=300)
    xs = _inputs(world_size)
    exact = torch.stack(xs).sum(dim=0)
    expected = reference_sum(xs)
    chunk = -(-NUMEL // world_size)
    for rank, (summed, sent, scattered, scatter_sent) in enumerate(results):
        assert torch.equal(summed, results[0][0])  # identical on every rank
        assert torch.equal(summed, expected)  # the documented algorithm, bit for bit
        # all-to-all + all-gather of packed chunks: 2 (n - 1) (8 + C) bytes, on dp only
        assert sent["dp"] == 2 * (world_size - 1) * (HEADER_BYTES + chunk)
        assert sent["dp_bf16"] == sent["dp"]  # codes are bytes whatever the gradient dtype
        full_fp32 = 2 * (world_size - 1) * chunk * 4  # a ring all-reduce, as CommStats counts
        assert 0.25 <= sent["dp"] / full_fp32 < 0.26  # about a quarter in fp32
        assert 0.5 <= sent["dp"] / (full_fp32 / 2) < 0.52  # about a half against bf16
        assert scatter_sent["dp"] == (world_size - 1) * (HEADER_BYTES + chunk)
        # ZeRO-1's slice: the peers' quantised copies plus our exact chunk, before re-quantising
        own = slice(rank * chunk, min((rank + 1) * chunk, NUMEL))
        peers = sum(_step(x[own]) / 2 for i, x in enumerate(xs) if i != rank)
        error = (scattered[: own.stop - own.start] - exact[own]).abs().max().item()
        assert error <= peers * (1 + 1e-5)
    # within two quantisation steps of the exact mean (the bound)
    step = max(_step(x) for x in xs)
    assert (expected / world_size - exact / world_size).abs().max() <= 2 * step
    # and really compressed: not the exact sum
    assert not torch.equal(expected, exact)


def test_hierarchical_bytegrad_sum_is_identical_on_every_rank_and_close_to_exact():
    world_size = 4  # two nodes of two ranks: full precision inside, ByteGrad across
    results = run_ranks(_body, world_size, 2, timeout=300)
    xs = _inputs(world_size)
    exact = torch.stack(xs).sum(dim=0)
    # node sums are exact; one peer copy and the final re-quantisation of each half
    node_sums = [xs[0] + xs[1], xs[2] + xs[3]]
    bound = max(_step(s) for s in node_sums) / 2 + _step(exact) / 2
    for rank, (summed, sent, scattered, _) in enumerate(results):
        assert torch.equal(summed, results[0][0])
        assert (summed - exact).abs().max().item() <= bound * (1 + 1e-3)
        half = -(-NUMEL // 2)
        # inside the node: fp32 reduce-scatter + all-gather of halves; across: packed quarters
        quarter = -(-half // 2)
        inside = 2 * (half * 4)
        across = 2 * (HEADER_BYTES + quarter)
        assert sent["dp"] == inside + across
        padded_chunk = -(-NUMEL // world_size)
        own = slice(rank * padded_chunk, min((rank + 1) * padded_chunk, NUMEL))
        error = (scattered[: own.stop - own.start] - exact[own]).abs().max().item()
        assert error <= bound * (1 + 1e-3)
