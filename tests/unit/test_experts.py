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


def test_auto_picks_grouped_mm_for_small_cpu_experts_only():
    x = torch.zeros(1, 8)
    small = GroupedExperts(2, 128, 256, grouped_gemm="auto")
    large = GroupedExperts(2, 1024, 1024, grouped_gemm="auto")
    assert small.use_grouped_mm(x) and not large.use_grouped_mm(x)
    assert not GroupedExperts(2, 128, 256, grouped_gemm="off").use_grouped_mm(x)
    # grouped_mm wants 16-byte row strides: a 2-wide FFN stays on the loop
    assert not GroupedExperts(2, 32, 2, grouped_gemm="auto").use_grouped_mm(x)


def test_auto_picks_grouped_mm_for_native_bf16_products_of_any_size():
    large = GroupedExperts(2, 1024, 1024, grouped_gemm="auto")
    x_bf16 = torch.zeros(1, 1024, dtype=torch.bfloat16)
    large.bf16_gemm = "native"
    assert large.use_grouped_mm(x_bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert large.use_grouped_mm(torch.zeros(1, 1024))  # autocast's bf16 products
    large.bf16_gemm = "fp32"  # bf16 products upcast to fp32 GEMMs: the loop, as for fp32
    assert not large.use_grouped_mm(x_bf16)
    assert not large.use_grouped_mm(torch.zeros(1, 1024))
    unaligned = GroupedExperts(2, 1024, 1026, grouped_gemm="auto")
    unaligned.bf16_gemm = "native"
    assert not unaligned.use_grouped_mm(x_bf16)


def test_grouped_mm_with_upcast_bf16_matches_the_upcast_loop():
    """bf16 under autocast with bf16 products run as fp32 GEMMs: both paths round the same
    operands, so they agree far closer than bf16 and fp32 do."""
    torch.manual_seed(0)
    x, probs, tpe = torch.randn(40, 16), torch.rand(40), torch.tensor([15, 0, 25])
    outputs, grads = {}, {}
    for path in ("on", "off"):
        torch.manual_seed(1)
        experts = GroupedExperts(3, 16, 32, grouped_gemm=path)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.2)
        experts.bf16_gemm = "fp32"
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = experts(x_in, probs, tpe)
        out.float().pow(2).sum().backward()
        outputs[path] = out
        grads[path] = [x_in.grad] + [p.grad for p in experts.parameters()]
    assert outputs["on"].dtype == outputs["off"].dtype == torch.bfloat16
    torch.testing.assert_close(outputs["on"].float(), outputs["off"].float(), rtol=2e-2, atol=1e-2)
    for on, off in zip(grads["on"], grads["off"], strict=True):
        torch.testing.assert_close(on.float(), off.float(), rtol=3e-2, atol=3e-2)
