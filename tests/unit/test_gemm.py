"""bf16 products as fp32 GEMMs (kernels/gemm.py) and the expert loop's hand-written backward
(kernels/expert_loop.py) against torch's own kernels and autograd."""

import pytest
import torch
import torch.nn.functional as F

from moefold.kernels import gemm
from moefold.kernels.expert_loop import swiglu_expert_loop
from moefold.model.experts import loop_reference


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _forward_backward(fn, inputs, grad_out):
    out = fn(*inputs)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in inputs]


def _max_relative_error(got, want) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))


def test_mode_resolution():
    assert not gemm.upcasts_bf16(torch.device("cpu"), "native")
    assert gemm.upcasts_bf16(torch.device("cpu"), "fp32")
    assert not gemm.upcasts_bf16(torch.device("cuda"), "auto")  # never on GPUs
    assert gemm.upcasts_bf16(torch.device("cpu"), "auto") == gemm.cpu_bf16_gemm_is_slow()
    assert isinstance(gemm.cpu_bf16_gemm_is_slow(), bool)


def test_auto_resolves_by_hardware_and_model_width():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    wide, narrow = gemm.SMALL_CPU_MODEL_HIDDEN, gemm.SMALL_CPU_MODEL_HIDDEN - 1
    for mode in ("native", "fp32"):  # explicit modes are kept, whatever the model
        assert gemm.resolve_bf16_gemm(mode, cpu, narrow) == mode
    assert gemm.resolve_bf16_gemm("auto", cpu, narrow) == "fp32"
    hardware = "fp32" if gemm.cpu_bf16_gemm_is_slow() else "native"
    assert gemm.resolve_bf16_gemm("auto", cpu, wide) == hardware
    assert gemm.resolve_bf16_gemm("auto", cuda, narrow) == "native"  # GPUs keep their kernels
    with pytest.raises(AssertionError):
        gemm.resolve_bf16_gemm("fast", cpu, wide)


def test_fp32_paths_are_torch_itself():
    x, w, b = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    for mode in gemm.BF16_GEMM_MODES:
        assert torch.equal(gemm.linear(x, w, b, mode), F.linear(x, w, b))
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    out = gemm.scaled_dot_product_attention(q, k, v, "fp32", is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-tensors", "autocast"])
def test_upcast_linear_matches_native_bf16(autocast):
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=generator) for s in ((2, 7, 32), (24, 32), (24,)))
    grad_out = torch.randn(2, 7, 24, generator=generator)
    dtype = torch.float32 if autocast else torch.bfloat16
    want64 = _forward_backward(F.linear, _leaves(x.double(), w.double(), b.double()), grad_out)
    results = {}
    for mode in ("native", "fp32"):
        inputs = _leaves(x.to(dtype), w.to(dtype), b.to(dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = gemm.linear(*inputs, bf16_gemm=mode)
        assert out.dtype == torch.bfloat16
        out.backward(grad_out.to(out.dtype))
        assert all(t.grad.dtype == dtype for t in inputs)  # fp32 masters get fp32 grads
        results[mode] = [out.detach().double()] + [t.grad.double() for t in inputs]
    # Both are bf16 GEMMs with fp32 accumulation: equally close to float64, and to each other.
    for mode, got in results.items():
        assert _max_relative_error(got, want64) < 1e-2, mode
    assert _max_relative_error(results["fp32"], results["native"]) < 1e-2


def test_upcast_attention_matches_native_bf16():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 16, generator=generator)
    k, v = torch.randn(2, 2, 2, 9, 16, generator=generator).unbind(0)
    grad_out = torch.randn(2, 4, 9, 16, generator=generator)

    def attention(mode):
        return lambda q, k, v: gemm.scaled_dot_product_attention(
            q, k, v, mode, is_causal=True, enable_gqa=True
        )

    want = _forward_backward(
        attention("fp32"), _leaves(q.double(), k.double(), v.double()), grad_out
    )
    for mode in ("native", "fp32"):
        got = _forward_backward(
            attention(mode), _leaves(q.bfloat16(), k.bfloat16(), v.bfloat16()), grad_out
        )
        assert _max_relative_error(got, want) < 2e-2, mode


COUNTS = [5, 0, 7, 3]  # an expert without rows must get a zero gradient


def _expert_inputs(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(2)
    R, e, D, F_ = sum(COUNTS), len(COUNTS), 16, 24
    x = torch.randn(R, D, generator=generator, dtype=torch.float64)
    probs = torch.rand(R, generator=generator, dtype=torch.float64)
    weights = [
        torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.3
        for shape in ((e, D, F_), (e, D, F_), (e, F_, D))
    ]
    grad_out = torch.randn(R, D, generator=generator, dtype=torch.float64)
    return [x.to(dtype), probs, *(w.to(dtype) for w in weights)], grad_out


def _reference(x, probs, gate, up, down):
    return loop_reference(x, probs, torch.tensor(COUNTS), gate, up, down)


def test_expert_loop_backward_is_exact_in_float64():
    inputs, grad_out = _expert_inputs(torch.float64)
    want = _forward_backward(_reference, _leaves(*inputs), grad_out)
    got = _forward_backward(
        lambda *t: swiglu_expert_loop(*t, COUNTS, upcast_bf16=False), _leaves(*inputs), grad_out
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert all(torch.all(grad[1] == 0) for grad in got[3:])  # the expert without rows


def test_expert_loop_skips_gradients_nobody_wants():
    inputs, grad_out = _expert_inputs(torch.float32)
    x, probs, gate, up, down = inputs
    gate.requires_grad_()  # only the gate weight is a leaf that wants a gradient
    swiglu_expert_loop(x, probs, gate, up, down, COUNTS, upcast_bf16=False).backward(
        grad_out.float()
    )
    assert gate.grad is not None and x.grad is None and up.grad is None


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-params", "autocast"])
def test_expert_loop_bf16_upcast_and_native_agree(autocast):
    inputs64, grad_out = _expert_inputs(torch.float64)
    want = _forward_backward(_reference, _leaves(*inputs64), grad_out)
    dtype = torch.float32 if autocast else torch.bfloat16
    results = {}
    for upcast in (False, True):
        inputs = _leaves(*(t.to(dtype) if t.ndim != 1 else t.float() for t in inputs64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = swiglu_expert_loop(*inputs, COUNTS, upcast_bf16=upcast)
            assert out.dtype == torch.bfloat16
            out.backward(grad_out.to(out.dtype))  # backward inside autocast, as checkpoints do
        assert [t.grad.dtype for t in inputs] == [t.dtype for t in inputs]
        results[upcast] = [out.detach().double()] + [t.grad.double() for t in inputs]
        assert _max_relative_error(results[upcast], want) < 2e-2, upcast
    assert _max_relative_error(results[True], results[False]) < 2e-2
