"""kernels/cpu_attention.py against torch's SDPA: exact in fp64 (grouped KV heads, gradients),
within bf16 rounding in bf16, and chosen by the transformer only for native bf16 on CPU."""

import pytest
import torch
import torch.nn.functional as F

from moefold.kernels import cpu_attention, gemm
from moefold.model import transformer as transformer_module


def _qkv(batch, heads, groups, seq, head_dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq, head_dim), (batch, groups, seq, head_dim)]
    q = torch.randn(shapes[0], generator=gen, dtype=dtype)
    k, v = (torch.randn(shapes[1], generator=gen, dtype=dtype) for _ in range(2))
    grad = torch.randn(shapes[0], generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)], grad


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
def test_fp64_equals_sdpa_with_gradients(heads, groups):
    inputs, grad = _qkv(2, heads, groups, 9, 8)
    want = _sdpa(*inputs)
    want_grads = torch.autograd.grad(want, inputs, grad)
    got = cpu_attention.causal_attention(*inputs, torch.float64)
    got_grads = torch.autograd.grad(got, inputs, grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_bf16_within_rounding_of_fp64():
    inputs, grad = _qkv(2, 4, 2, 32, 16)
    want = _sdpa(*inputs)
    want_grads = torch.autograd.grad(want, inputs, grad)
    want = want.detach()
    got = cpu_attention.causal_attention(*inputs, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    got_grads = torch.autograd.grad(got, inputs, grad)
    for g, w in zip((got, *got_grads), (want, *want_grads), strict=True):
        assert float((g.detach().double() - w).abs().max() / w.abs().max()) < 3e-2


def test_first_position_sees_only_itself():
    (q, k, v), _ = _qkv(1, 2, 1, 5, 4)
    out = cpu_attention.causal_attention(q, k, v, torch.float64)
    torch.testing.assert_close(out[:, :, 0], v[:, :1, 0].expand(1, 2, 4))


def test_uneven_heads_rejected():
    (q, k, v), _ = _qkv(1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="heads"):
        cpu_attention.causal_attention(q, k, v, torch.float64)


def test_transformer_uses_it_only_for_native_bf16_on_cpu(monkeypatch):
    calls = []
    real = cpu_attention.causal_attention

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(cpu_attention, "causal_attention", spy)
    (q, k, v), _ = _qkv(1, 2, 1, 4, 4, dtype=torch.float32)
    positions = torch.arange(4)
    transformer_module.causal_attention(q, k, v, positions, "native")  # fp32: SDPA
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = transformer_module.causal_attention(q, k, v, positions, "native")
        assert calls == [torch.bfloat16] and out.dtype == torch.bfloat16
        transformer_module.causal_attention(q, k, v, positions, "fp32")  # upcast: fp32 SDPA
    assert calls == [torch.bfloat16]
    assert gemm.upcasts_bf16(q.device, "fp32")
