"""Grouped experts (loop and grouped_mm paths) against the plain loop reference."""

import pytest
import torch

from moefold.model.experts import GroupedExperts, loop_reference


@pytest.mark.parametrize("path", ["off", "on"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [10, 0, 0, 0], [0, 0, 0, 0]])
def test_grouped_experts_match_loop_reference(path, counts):
    experts = GroupedExperts(4, 16, 24, grouped_gemm=path)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    R = sum(counts)
    x = torch.randn(R, 16, requires_grad=True)
    probs = torch.rand(R, requires_grad=True)
    tpe = torch.tensor(counts)
    out = experts(x, probs, tpe)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    got = [x.grad, probs.grad] + [p.grad for p in experts.parameters()]
    x2, probs2 = x.detach().clone().requires_grad_(), probs.detach().clone().requires_grad_()
    weights = [p.detach().clone().requires_grad_() for p in experts.parameters()]
    ref = loop_reference(x2, probs2, tpe, *weights)
    ref.backward(grad_out)
    want = [x2.grad, probs2.grad] + [w.grad for w in weights]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.all(g == 0)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_grouped_mm_bf16_close_to_fp32():
    experts = GroupedExperts(2, 16, 32, grouped_gemm="on")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, probs, tpe = torch.randn(6, 16), torch.rand(6), torch.tensor([4, 2])
    ref = experts(x, probs, tpe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, probs, tpe)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
