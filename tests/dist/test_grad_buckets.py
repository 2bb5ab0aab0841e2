"""Overlapped gradient buckets: launched from backward hooks only once every forward of the step
is done (never for an earlier micro-batch), all of them before backward returns, and counted
in CommStats exactly once each; ZeRO-1 checkpoints of bucketed master slices reshard."""

import math

import pytest
import torch

from moefold.parallel.data_parallel import REDUCE_GROUP, parameter_family
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from moefold.testing.reference import LOSS_RTOL, build_test_trainer
from tests.dist.test_reshard import STEPS, train_body
from tests.equivalence.layouts import job_for, reference

OVERLAP = {"overlap_grad_reduce": "true", "grad_bucket_mb": 0.01}


def expected_bytes(trainer, groups) -> dict[str, int]:
    """dp / edp bytes of one step's reduction, from the parameters (not from the buckets):
    all-reduce 2 (n - 1) / n of each family's gradient bytes; for ZeRO-1 a reduce-scatter,
    (n - 1) / n of each bucket padded to a multiple of n."""
    out = {"dp": 0, "edp": 0}
    zero1 = trainer.job.parallel.distributed_optimizer
    buckets = trainer.optimizer.reducer.buckets
    if zero1:
        for bucket in buckets:
            numel = sum(p.numel() for p in bucket.params)
            if bucket.size > 1:
                out[bucket.family] += (bucket.size - 1) * math.ceil(numel / bucket.size) * 4
        return out
    for param in trainer.model.parameters():
        family = parameter_family(param)
        size = groups.size(REDUCE_GROUP[family])
        out["edp" if family == "expert" else "dp"] += 2 * (size - 1) * param.numel() * 4 // size
    return out


def body(rank, world_size, parallel: dict, model_overrides: tuple):
    job = job_for(model_overrides, {**parallel, **OVERLAP})
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    trainer = build_test_trainer(job, groups)
    reducer = trainer.optimizer.reducer
    launched_at_forward = []
    for layer in trainer.model.layers.values():
        layer.register_forward_pre_hook(lambda *_: launched_at_forward.append(reducer.launched))
    trainer.model.train()
    groups.comm_stats.reset()
    trainer.runner.forward_backward(trainer.loader.next_batch())
    launched_in_backward = reducer.launched
    trainer.optimizer.reduce_gradients()
    sent = groups.comm_stats.as_dict()
    return {
        "forwards": len(launched_at_forward),
        "launched_at_forward": sorted(set(launched_at_forward)),
        "launched_in_backward": launched_in_backward,
        "buckets": len(reducer.buckets),
        "after_finish": reducer.launched,
        "sent": {family: sent[family] for family in ("dp", "edp")},
        "expected": expected_bytes(trainer, groups),
    }


LAYOUTS = {
    "dp2": (2, {}, ()),
    "tp2-dp2__ep2": (4, {"tp": 2, "ep": 2}, ()),
    "pp2-vpp2-dp2__pp2-ep2": (
        4,
        {"pp": 2, "vpp": 2, "pp_schedule": "interleaved_1f1b", "ep": 2},
        ("model.layers=4",),
    ),
    "tp2-dp2__ep2-zero1": (4, {"tp": 2, "ep": 2, "distributed_optimizer": "true"}, ()),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_buckets_launch_during_the_last_backward_and_are_counted_once(layout):
    world_size, parallel, model_overrides = LAYOUTS[layout]
    for rank, result in enumerate(
        run_ranks(body, world_size, parallel, model_overrides, timeout=900)
    ):
        assert result["forwards"] > 0, rank
        assert result["launched_at_forward"] == [0], rank  # nothing before the last backward
        assert result["buckets"] >= 3, rank
        assert result["launched_in_backward"] == result["buckets"], rank  # all from hooks
        assert result["after_finish"] == 0, rank  # reset for the next step
        assert result["sent"] == result["expected"], rank


@pytest.mark.dist
def test_bucketed_zero1_checkpoint_resumes_without_overlap(tmp_path):
    zero1 = {"distributed_optimizer": "true"}
    ckpt = str(tmp_path / "ckpt")
    first = run_ranks(train_body, 2, {**zero1, **OVERLAP}, 2, ckpt, timeout=900)[0]
    second = run_ranks(train_body, 2, zero1, STEPS, ckpt, timeout=900)[0]
    got = [loss for _, loss in first + second]
    ref = reference((f"train.steps={STEPS}",))["losses"]
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(ref, dtype=torch.float64),
        rtol=LOSS_RTOL,
        atol=0,
    )
