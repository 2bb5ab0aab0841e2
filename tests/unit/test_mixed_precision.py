"""Megatron-style bf16 mixed precision, measured by the dry run: bytes per parameter are
2 (bf16 weight) + 4 (fp32 gradient) + 12 (fp32 main parameter and moments), the 12 sharded
over the reduction group by the distributed optimizer; and the planner's moefold layout
(tables and shared expert whole on every tp rank) predicts the dry run's parameter and
optimizer bytes exactly."""

import pytest
import torch

from moefold.config import load_job
from moefold.dryrun.planner import PlannerFigures
from moefold.dryrun.routing import RoutingOverride
from moefold.dryrun.step import run_rank
from moefold.parallel.mixed_precision import accumulate_in_fp32, grad_of

BF16 = ["train.dtype=bf16"]


def _row(overrides, world_size=4, rank=0):
    return run_rank(load_job("tiny-moe", [*BF16, *overrides]), world_size, rank, RoutingOverride())


def test_replicated_optimizer_holds_18_bytes_per_parameter():
    row = _row([])
    n, mem = row.param_count, row.memory_bytes
    assert mem["params"] == 2 * n  # bf16 weights
    assert mem["grads"] == 4 * n  # fp32 main gradients
    # fp32 main parameters + two fp32 moments (+ AdamW's 4-byte step count per tensor)
    assert mem["optimizer"] == pytest.approx(12 * n, abs=1024)


@pytest.mark.parametrize("reduce_dtype, grad_bytes", [("fp32", 4), ("bf16", 2)])
def test_distributed_optimizer_holds_6_plus_12_over_dp(reduce_dtype, grad_bytes):
    # tiny-moe on 4 ranks: dp = edp = 4, every family sharded 4 ways
    row = _row(["parallel.distributed_optimizer=true", f"train.grad_reduce_dtype={reduce_dtype}"])
    n, mem = row.param_count, row.memory_bytes
    pad = 4 * 8 * 16  # each (family, decay) buffer padded to a multiple of 4 elements
    assert mem["params"] == pytest.approx(2 * n, abs=pad)
    assert mem["optimizer"] == pytest.approx(12 * n / 4, abs=3 * pad + 64)
    # one gradient buffer, reduce-scattered in place (Megatron's); reduced in bf16, the
    # optimizer's fp32 copy of this rank's slice comes on top
    upcast = 4 * n / 4 if reduce_dtype == "bf16" else 0
    assert mem["grads"] == pytest.approx(grad_bytes * n + upcast, abs=2 * pad)
    if reduce_dtype == "fp32":  # Megatron-Core's 6 + 12/dp
        total = mem["params"] + mem["grads"] + mem["optimizer"]
        assert total == pytest.approx((6 + 12 / 4) * n, abs=6 * pad + 64)
    assert row.comm_bytes["dp"] > 0


def test_fp32_distributed_optimizer_steps_the_parameters_in_place():
    """fp32 parameters are their own masters (Megatron): 4 + 4 + 8/dp bytes per parameter."""
    job = load_job("tiny-moe", ["parallel.distributed_optimizer=true"])
    row = run_rank(job, 4, 0, RoutingOverride())
    n, mem, pad = row.param_count, row.memory_bytes, 4 * 8 * 16
    assert mem["params"] == pytest.approx(4 * n, abs=pad)
    assert mem["grads"] == pytest.approx(4 * n, abs=pad)
    assert mem["optimizer"] == pytest.approx(8 * n / 4, abs=2 * pad + 64)


def test_planner_predicts_the_moefold_tp_layout():
    """tp = 2 with a shared expert: the embedding, head and shared expert are whole on each tp
    rank and their optimizer shards span dp x cp x tp; the planner's moefold layout says so."""
    overrides = [
        "parallel.tp=2",
        "parallel.ep=2",
        "parallel.distributed_optimizer=true",
        "moe.shared_ffn_hidden=64",
    ]
    job = load_job("tiny-moe", [*BF16, *overrides])
    row = run_rank(job, 8, 0, RoutingOverride())
    plan = PlannerFigures(job, 8).memory(row.pp_rank)
    assert plan["params"] == row.memory_bytes["params"]
    assert plan["optimizer"] == pytest.approx(row.memory_bytes["optimizer"], rel=1e-4)
    assert plan["grads"] == pytest.approx(row.memory_bytes["grads"], rel=1e-4)


def test_main_gradients_accumulate_in_fp32():
    """Two bf16 backward passes sum in the fp32 main gradient, not in bf16: 1 + 2^-9 survives
    (it would round to 1 in bf16)."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    accumulate_in_fp32([weight])
    (weight * 1.0).sum().backward()
    (weight * 2.0**-9).sum().backward()
    assert weight.grad is None
    main = grad_of(weight)
    assert main.dtype == torch.float32
    assert torch.equal(main, torch.full((4,), 1 + 2.0**-9))
