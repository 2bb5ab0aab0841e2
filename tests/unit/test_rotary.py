"""The hand-written rotary embedding equals rotate_half's formula, and its backward is exact."""

import torch

from moefold.kernels.rotary import apply_rotary
from moefold.kernels.rotary import rotary_reference as rotate_half_reference
from moefold.model.transformer import rotary_tables


def test_backward_is_exact_in_float64_with_unequal_halves():
    """Random tables whose halves differ, so a backward that swapped sin's halves would fail."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))
    torch.testing.assert_close(apply_rotary(x, cos, sin), rotate_half_reference(x, cos, sin))


def _query_and_grad(dtype):
    """As attention calls it: a [B, S, H, Dh] projection viewed as [B, H, S, Dh]."""
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 32).to(dtype).transpose(1, 2).requires_grad_()
    return q, torch.randn(2, 4, 16, 32).to(dtype)


def test_fp32_matches_rotate_half_on_a_transposed_query():
    q, grad = _query_and_grad(torch.float32)
    cos, sin = rotary_tables(torch.arange(3, 19), 32, 10000.0)
    out = apply_rotary(q, cos, sin)
    reference = rotate_half_reference(q, cos, sin)
    # Rounded op by op like rotate_half's formula: equal to the last bit, both ways.
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    got, expected = (torch.autograd.grad(y, q, grad)[0] for y in (out, reference))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bf16_rounds_once_from_the_exact_result():
    """bf16 in and out, fp32 inside: output and gradient within half a bf16 ulp (2^-8 relative)
    of the float64 result on the same bf16 values (autograd over rotate_half rounds the
    gradient's two terms separately, up to 0.7 relative off near cancellations)."""
    q, grad = _query_and_grad(torch.bfloat16)
    cos, sin = rotary_tables(torch.arange(3, 19), 32, 10000.0)
    out = apply_rotary(q, cos, sin)
    (got,) = torch.autograd.grad(out, q, grad)
    assert out.dtype == got.dtype == torch.bfloat16
    q64 = q.detach().double().requires_grad_()
    exact = rotate_half_reference(q64, cos.double(), sin.double())
    (exact_grad,) = torch.autograd.grad(exact, q64, grad.double())
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(got.double(), exact_grad, rtol=2**-8, atol=1e-6)
