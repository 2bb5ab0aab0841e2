"""ByteGrad gradient compression (parallel.grad_compression = "bytegrad") on folded layouts: the
run trains, stays within a stated tolerance of the uncompressed run (the single-process
reference, which uncompressed layouts match to LOSS_RTOL), really is compressed, and sends
the bytes of the compressed collectives, counted exactly, in place of the full-precision ones.

Tolerances, measured on these layouts when written (5 steps of the tiny model, lr 0.01):
losses within 0.24% (bound 1%); step-1 gradients within 0.65% of the largest gradient
element (bound 2%: two quantisation steps of 1/255 of a chunk's range, where a chunk's range
is at most about twice its largest element); grad norms within 5.2% (bound 15%: the norm also
sums the quantisation noise of the many near-zero elements, which AdamW then normalises).
"""

import pytest
import torch

from moefold.parallel.bytegrad import HEADER_BYTES
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from moefold.testing.reference import build_test_trainer
from tests.equivalence.layouts import job_for, layout_body, reference

pytestmark = pytest.mark.dist

BYTEGRAD = {"grad_compression": "bytegrad"}
OVERLAP = {"overlap_grad_reduce": "true", "grad_bucket_mb": 0.01}
ZERO1 = {"distributed_optimizer": "true"}
HIERARCHICAL = {"grad_compression_hierarchical": "true", "grad_compression_node_size": 2}
LOSS_RTOL_COMPRESSED = 1e-2
GRAD_TOL_OF_MAX = 2e-2
GRAD_NORM_RTOL_COMPRESSED = 0.15

# name -> (world size, parallel settings)
LAYOUTS = {
    "tp2-dp2__ep2": (4, {"tp": 2, "ep": 2}),
    "dp4__ep4": (4, {"ep": 4}),
    "pp2-dp2__pp2-ep2": (4, {"pp": 2, "ep": 2}),
    "dp4__ep2-overlap": (4, {"ep": 2, **OVERLAP}),
    "tp2-dp2__ep2-zero1-overlap": (4, {"tp": 2, "ep": 2, **ZERO1, **OVERLAP}),
    "dp4__ep2-hierarchical": (4, {"ep": 2, **HIERARCHICAL}),
    # replicated weights: a node-local reduce-scatter, ByteGrad across; tp-sharded and expert
    # weights have one rank per node in their groups: ByteGrad only
    "tp2-dp2__ep2-zero1-hierarchical": (4, {"tp": 2, "ep": 2, **ZERO1, **HIERARCHICAL}),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_bytegrad_trains_within_tolerance_of_uncompressed(layout):
    world_size, parallel = LAYOUTS[layout]
    result = run_ranks(layout_body, world_size, (), {**parallel, **BYTEGRAD}, timeout=900)[0]
    ref = reference(())
    losses = torch.tensor(result["losses"], dtype=torch.float64)
    ref_losses = torch.tensor(ref["losses"], dtype=torch.float64)
    torch.testing.assert_close(losses, ref_losses, rtol=LOSS_RTOL_COMPRESSED, atol=0)
    assert losses[-1] < losses[0]  # it trains
    norms = torch.tensor(result["grad_norms"], dtype=torch.float64)
    ref_norms = torch.tensor(ref["grad_norms"], dtype=torch.float64)
    torch.testing.assert_close(norms, ref_norms, rtol=GRAD_NORM_RTOL_COMPRESSED, atol=0)
    largest = max(g.abs().max().item() for g in ref["grads"].values())
    errors = {n: (result["grads"][n] - g).abs().max().item() for n, g in ref["grads"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL_OF_MAX * largest, (worst, errors[worst], largest)
    assert errors[worst] > 1e-4 * largest  # compressed, not the exact sum


def _bytes_body(rank, world_size, parallel: dict) -> dict:
    job = job_for((), parallel)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    trainer = build_test_trainer(job, groups)
    trainer.model.train()
    groups.comm_stats.reset()
    trainer.runner.forward_backward(trainer.loader.next_batch())
    trainer.optimizer.reduce_gradients()
    sent = groups.comm_stats.as_dict()
    expected = {"dp": 0, "edp": 0}
    for bucket in trainer.optimizer.reducer.buckets:
        numel = sum(p.numel() for p in bucket.params)
        n = bucket.size
        if n > 1:  # all-to-all of packed chunks (+ the all-gather of packed sums unless ZeRO-1)
            halves = 1 if job.parallel.distributed_optimizer else 2
            expected[bucket.family] += halves * (n - 1) * (HEADER_BYTES + -(-numel // n))
    return {"sent": {f: sent[f] for f in expected}, "expected": expected}


@pytest.mark.parametrize("zero1", [False, True], ids=["all-reduce", "zero1"])
def test_bytegrad_sends_packed_chunks_on_both_families(zero1):
    parallel = {**BYTEGRAD, **(ZERO1 if zero1 else {})}
    for result in run_ranks(_bytes_body, 2, parallel, timeout=600):  # dp2 x edp2
        assert result["sent"] == result["expected"]
        assert result["sent"]["dp"] > 0 and result["sent"]["edp"] > 0
