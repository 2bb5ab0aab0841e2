"""bf16 mixed precision (train.dtype=bf16, Megatron-Core's scheme: bf16 parameters, fp32 main
parameters, moments and gradient sums) gives the single process's bf16 losses on the folded
layouts, with the replicated and the distributed optimizer, overlapped buckets, and bf16
gradient reduction.

Tolerance: bf16 activations round at 2^-8 relative, and a layout changes the order of their
sums (tp partial sums, the pipeline's micro-batch order, ep's token order), so the losses agree
to BF16_LOSS_RTOL (a few bf16 rounding units of the loss), not bit for bit. The grad norms
agree to BF16_GRAD_NORM_RTOL. Both are tight enough that an fp32 run, or a run that lost a
gradient family's reduction, falls outside them (test_bf16_tolerance_separates_precisions).
"""

import pytest
import torch

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference

BF16 = ("train.dtype=bf16",)
BF16_LOSS_RTOL = 2e-3
BF16_GRAD_NORM_RTOL = 3e-2
ZERO1 = {"distributed_optimizer": "true"}
OVERLAP = {"overlap_grad_reduce": "true", "grad_bucket_mb": 0.01}

# name -> (world size, parallel settings, extra overrides)
LAYOUTS = {
    "dp4": (4, {}, ()),
    "tp2-dp2__ep2-zero1": (4, {"tp": 2, "ep": 2, **ZERO1}, ()),
    "pp2-dp2__pp2-ep2-zero1-overlap": (4, {"pp": 2, "ep": 2, **ZERO1, **OVERLAP}, ()),
    "cp2-dp2__ep2-etp2-bf16reduce": (
        4,
        {"cp": 2, "ep": 2, "etp": 2},
        ("train.grad_reduce_dtype=bf16",),
    ),
}


def assert_close_bf16(result: dict, ref: dict) -> None:
    assert_matches(
        result,
        ref,
        check_grads=False,
        loss_rtol=BF16_LOSS_RTOL,
        grad_norm_rtol=BF16_GRAD_NORM_RTOL,
    )


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_bf16_layout_matches_single_process_bf16(layout):
    world_size, parallel, extra = LAYOUTS[layout]
    overrides = (*BF16, *extra)
    result = run_ranks(layout_body, world_size, overrides, parallel, timeout=900)[0]
    assert_close_bf16(result, reference(overrides))
    # the parameters are bf16 (the fp32 main copies live in the optimizer)
    assert all(p.dtype == torch.bfloat16 for p in result["params"].values())


def test_bf16_tolerance_separates_precisions():
    """The single-process bf16 run differs from fp32 by more than the tolerance somewhere over
    the steps, but not by more than bf16 training should (0.5%)."""
    bf16, fp32 = reference(BF16), reference(())
    losses = torch.tensor(bf16["losses"], dtype=torch.float64)
    fp32_losses = torch.tensor(fp32["losses"], dtype=torch.float64)
    rel = ((losses - fp32_losses).abs() / fp32_losses).max()
    assert 0 < rel < 5e-3
    norms = torch.tensor(bf16["grad_norms"]) / torch.tensor(fp32["grad_norms"])
    assert (norms - 1).abs().max() < BF16_GRAD_NORM_RTOL
    assert all(p.dtype == torch.bfloat16 for p in bf16["params"].values())


@pytest.mark.dist
@pytest.mark.parametrize("reduce_dtype", ["fp32", "bf16"])
def test_bf16_with_bytegrad_trains(reduce_dtype):
    """ByteGrad's 8-bit sums of bf16 runs' gradients (fp32 main gradients or bf16 ones) keep
    the loss within ByteGrad's own tolerance of the single process (test_grad_compression)."""
    overrides = (*BF16, f"train.grad_reduce_dtype={reduce_dtype}")
    parallel = {"ep": 2, "grad_compression": "bytegrad"}
    result = run_ranks(layout_body, 4, overrides, parallel, timeout=900)[0]
    torch.testing.assert_close(
        torch.tensor(result["losses"], dtype=torch.float64),
        torch.tensor(reference(BF16)["losses"], dtype=torch.float64),
        rtol=1e-2,
        atol=0,
    )
