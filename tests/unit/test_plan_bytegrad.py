"""The planner's model of ByteGrad (parallel.grad_compression = "bytegrad"): a quarter of the
dp / edp gradient bytes against fp32 main gradients, ZeRO-1's parameter all-gather left in full
precision, the quantise passes charged to the step, and `moefold plan` saying when it pays."""

import dataclasses
import io
from contextlib import redirect_stdout

import pytest

from moefold.cli import main
from moefold.config import load_job
from moefold.plan.cost import (
    BYTEGRAD_PASS_BYTES,
    Candidate,
    CostModel,
    Workload,
)
from moefold.plan.hardware import gpu_device
from moefold.plan.search import plan, topology

WORLD = 64


def _workload(compression: str) -> Workload:
    job = load_job("mixtral-8x7b")
    moe = dataclasses.replace(job.moe, capacity_factor=1.0)
    return Workload(
        model=job.model, moe=moe, seq_len=4096, global_batch=256, grad_compression=compression
    )


def _candidate(zero1: bool) -> Candidate:
    # dense tp2 pp4 dp8, expert ep8 edp1... -> take ep4 so edp = 2 also reduces
    return Candidate(
        tp=2, cp=1, pp=4, vpp=1, dp=8, ep=4, etp=1, edp=4, micro_batch=1,
        recompute=True, distributed_optimizer=zero1,
    )  # fmt: skip


def _estimate(compression: str, zero1: bool, nodes_of: int = 8):
    c = _candidate(zero1)
    topo = topology(WORLD, c.tp, c.cp, c.pp, c.ep, c.etp, True, nodes_of)
    model = CostModel(_workload(compression), gpu_device("h100"))
    return model, model.estimate(c, topo, always=True)


@pytest.mark.parametrize("zero1", [False, True], ids=["all-reduce", "zero1"])
def test_bytegrad_sends_a_quarter_of_the_gradient_bytes(zero1):
    model, full = _estimate("none", zero1)
    _, compressed = _estimate("bytegrad", zero1)
    for family, size in (("dp", 8), ("edp", 4)):
        # the other families do not change
        assert compressed.comm_bytes["ep"] == full.comm_bytes["ep"]
        share = (size - 1) / size
        grads_full = (1 if zero1 else 2) * share * 4  # bytes per parameter, fp32 main grads
        weights = share * 2 if zero1 else 0.0  # bf16 parameter all-gather, never compressed
        per_param_full = grads_full + weights
        per_param = grads_full / 4 + weights
        params = full.comm_bytes[family] / per_param_full
        assert params > 0
        assert compressed.comm_bytes[family] == pytest.approx(params * per_param, rel=1e-9)
    if not zero1:
        assert compressed.comm_bytes["dp"] == pytest.approx(full.comm_bytes["dp"] / 4)


def test_quantise_passes_are_charged_even_when_the_network_is_free():
    """With infinitely fast links the compressed step is slower by exactly the quantise
    passes over each family's local gradients."""
    c = _candidate(False)
    device = dataclasses.replace(
        gpu_device("h100"),
        intra_node_bandwidth=float("inf"),
        inter_node_bandwidth=float("inf"),
        intra_node_latency=0.0,
        inter_node_latency=0.0,
    )
    topo = topology(WORLD, c.tp, c.cp, c.pp, c.ep, c.etp, True, 8)
    estimates = {
        name: CostModel(_workload(name), device).estimate(c, topo, always=True)
        for name in ("none", "bytegrad")
    }
    model = CostModel(_workload("bytegrad"), device)
    slowest = max((model.rank(c, topo, r) for r in model.ranks_to_check(c.pp, c.vpp)),
                  key=lambda rc: rc.time)  # fmt: skip
    for family, count in (("dp", slowest.params.dense), ("edp", slowest.params.expert)):
        extra = estimates["bytegrad"].time[family] - estimates["none"].time[family]
        assert extra == pytest.approx(count * BYTEGRAD_PASS_BYTES / device.memory_bandwidth)


def test_bytegrad_pays_across_slow_links_and_not_inside_a_fast_node():
    slow = dataclasses.replace(gpu_device("h100"), inter_node_bandwidth=1.25e9)  # 10 Gb/s
    fast = gpu_device("h100")
    c = _candidate(False)
    for device, nodes_of, pays in ((slow, 1, True), (fast, 64, False)):
        topo = topology(WORLD, c.tp, c.cp, c.pp, c.ep, c.etp, True, nodes_of)
        times = {
            name: CostModel(_workload(name), device).estimate(c, topo, always=True).time
            for name in ("none", "bytegrad")
        }
        compressed = times["bytegrad"]["dp"] + times["bytegrad"]["edp"]
        full = times["none"]["dp"] + times["none"]["edp"]
        assert (compressed < full) == pays, (nodes_of, compressed, full)


def test_search_keeps_the_faster_optimizer_under_bytegrad():
    """Without compression the replicated optimizer is never estimated (dominated); with
    ByteGrad it can win, since ZeRO-1's parameter all-gather is not compressed. Here every GPU
    is its own node on 10 Gb/s links and the batch is small, so data-parallel traffic rules."""
    slow = dataclasses.replace(gpu_device("h100"), inter_node_bandwidth=1.25e9)
    small = {"seq_len": 1024, "global_batch": 64}
    full = plan(dataclasses.replace(_workload("none"), **small), WORLD, slow, nodes_of=1, top=5)
    compressed = plan(
        dataclasses.replace(_workload("bytegrad"), **small), WORLD, slow, nodes_of=1, top=5
    )
    assert all(e.candidate.distributed_optimizer for e in full.ranked)
    assert compressed.num_evaluated > full.num_evaluated
    assert not compressed.ranked[0].candidate.distributed_optimizer
    assert compressed.ranked[0].step_time < 0.9 * full.ranked[0].step_time


def test_plan_command_says_whether_bytegrad_pays():
    out = io.StringIO()
    args = ["plan", "--model", "tiny-moe", "--gpus", "4", "--gpu", "h100", "--top", "1"]
    with redirect_stdout(out):
        assert main([*args, "--set", "parallel.grad_compression=bytegrad"]) == 0
    text = out.getvalue()
    assert "grad_compression=bytegrad on the first layout: dp+edp" in text
    assert any(verdict in text for verdict in ("it pays", "it does not pay", "nothing to gain"))
