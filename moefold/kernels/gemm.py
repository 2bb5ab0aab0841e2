"""Matrix products (linear, attention) in the dtype a layer computes in, with a fast path for
bf16 on CPUs that have no bf16 instructions.

Why this exists: torch's CPU bf16 GEMM is fast only where the CPU has bf16 instructions
(AVX512-BF16, AMX, Arm BF16). On an AVX2-only x86 CPU (e.g. AMD Zen 2/3) `torch.mm` in bf16
falls back to a scalar kernel: measured 0.27 GFLOP/s against 110 GFLOP/s in fp32 (2048^3,
2 threads, torch 2.13). `F.linear`'s forward goes to oneDNN there (14 GFLOP/s), but its
backward is two `mm`s on the slow path, and the bf16 SDPA backward is 5x slower than fp32.
On such CPUs moefold computes a bf16 product as an fp32 GEMM of the bf16 operands and rounds
the result to bf16. The product of two bf16 numbers is exact in fp32, so this is a bf16 GEMM
with fp32 accumulation - what the native kernels compute - at fp32 speed; only the summation
order differs. On CUDA and on CPUs with bf16 instructions the native kernels run unchanged.

`bf16_gemm` (train.bf16_gemm): "auto" (upcast on CPUs whose bf16 GEMM is slow, and for small
CPU models, `resolve_bf16_gemm`), "native"
(always torch's bf16 kernels, the reference), "fp32" (always upcast; for tests on any CPU).
fp32 compute is never touched: every function here is then exactly its torch counterpart.
"""

from __future__ import annotations

import functools
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

BF16_GEMM_MODES = ("auto", "native", "fp32")
# A bf16 GEMM this many times slower than fp32 counts as slow (measured 100-400x on AVX2; on
# CPUs with bf16 instructions bf16 is faster than fp32).
SLOW_FACTOR = 4.0
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo flags of native bf16 GEMMs
_BF16_ARM_FEATURES = ("bf16",)  # aarch64 /proc/cpuinfo "Features"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on `x` computes in: the autocast dtype inside autocast, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def _probe_bf16_is_slow(size: int = 256) -> bool:
    """Time one bf16 and one fp32 matmul (best of 3): the hardware test when flags are unknown."""
    a, b = torch.randn(size, size), torch.randn(size, size)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - tic)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) > SLOW_FACTOR * best(a, b)


@functools.cache
def cpu_bf16_gemm_is_slow() -> bool:
    """Whether this CPU lacks bf16 GEMM instructions (a hardware fact, decided once a process)."""
    flags, machine = _cpu_flags(), platform.machine()
    if flags is not None and machine in ("x86_64", "AMD64", "aarch64", "arm64"):
        wanted = _BF16_ARM_FEATURES if machine in ("aarch64", "arm64") else _BF16_CPU_FLAGS
        return not any(flag in flags for flag in wanted)
    return _probe_bf16_is_slow()


def upcasts_bf16(device: torch.device, mode: str) -> bool:
    """Whether bf16 products on `device` run as fp32 GEMMs under `mode` (see module docstring)."""
    if mode == "native":
        return False
    if mode == "fp32":
        return True
    assert mode == "auto", mode
    return device.type == "cpu" and cpu_bf16_gemm_is_slow()


# CPU models narrower than this train faster in bf16 with fp32 GEMMs even where the CPU has bf16
# units. Measured end to end (moefold bench train, bf16, AMD EPYC with avx512_bf16, 2 threads):
# tiny-moe (hidden 128) 306-430 ms a step with fp32 GEMMs against 480-610 ms native; the
# hidden-1024 preset is far faster native (bf16 GEMMs at ~4x the fp32 rate). At small widths
# every op is short, so autocast's per-op casts and the bf16 kernels' fixed costs outweigh the
# faster multiply-adds; see docs/decisions.md (Performance on CPU).
SMALL_CPU_MODEL_HIDDEN = 512


def cpu_bf16_gemm_is_native(hidden: int) -> bool:
    """Whether this CPU runs the bf16 products of a model of width `hidden` as native bf16
    GEMMs under train.bf16_gemm=auto (the planner's view of `resolve_bf16_gemm`)."""
    return resolve_bf16_gemm("auto", torch.device("cpu"), hidden) == "native"


def resolve_bf16_gemm(mode: str, device: torch.device, hidden: int) -> str:
    """train.bf16_gemm as a model of width `hidden` runs it: "auto" becomes "fp32" on a CPU whose
    bf16 GEMMs are slow or for a CPU model narrower than SMALL_CPU_MODEL_HIDDEN, else "native"
    (always "native" on GPUs); "native" and "fp32" stay as they are."""
    assert mode in BF16_GEMM_MODES, mode
    if mode != "auto":
        return mode
    small_cpu_model = device.type == "cpu" and hidden < SMALL_CPU_MODEL_HIDDEN
    return "fp32" if upcasts_bf16(device, "auto") or small_cpu_model else "native"


class GemmDtypes:
    """compute: the dtype the layer computes in (autocast's, or the input's); matmul: the dtype
    GEMM operands are cast to (fp32 when bf16 products are upcast, else compute)."""

    def __init__(self, compute: torch.dtype, upcast: bool) -> None:
        self.compute = compute
        self.matmul = torch.float32 if upcast and compute == torch.bfloat16 else compute

    @classmethod
    def for_input(cls, x: torch.Tensor, upcast_bf16: bool) -> GemmDtypes:
        """The dtypes of products on `x` (`compute_dtype`), upcast where `upcasts_bf16` says."""
        return cls(compute_dtype(x), upcast_bf16)

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """Round to the compute dtype (autocast's cast), then widen for the GEMM if upcasting."""
        return t.to(self.compute).to(self.matmul)


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def backward_without_autocast(backward):
    """Decorate an autograd Function's backward whose dtypes are explicit: backward may run
    inside the caller's autocast region, which must not recast its products."""

    @functools.wraps(backward)
    def run(ctx, grad_out, *more_grads):
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return backward(ctx, grad_out, *more_grads)

    return run


class _UpcastLinear(torch.autograd.Function):
    """y = x @ w.T + b for bf16 x, w, b as fp32 GEMMs; saves the bf16 inputs only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return _round_bf16(out)

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad32 = grad_out.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _round_bf16(grad32 @ weight.float())
        rows32 = grad32.reshape(-1, grad32.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = _round_bf16(rows32.T @ x.reshape(-1, x.shape[-1]).float())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _round_bf16(rows32.sum(0))
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, bf16_gemm="auto"
) -> torch.Tensor:
    """`F.linear`, with bf16 products upcast where `upcasts_bf16` says so."""
    if compute_dtype(x) != torch.bfloat16 or not upcasts_bf16(x.device, bf16_gemm):
        return F.linear(x, weight, bias)
    # Casting outside the function keeps autocast's contract: fp32 master weights receive the
    # gradient of their bf16 copy through the cast's own backward.
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias16 = None if bias is None else _round_bf16(bias)
        return _UpcastLinear.apply(_round_bf16(x), _round_bf16(weight), bias16)


def scaled_dot_product_attention(q, k, v, bf16_gemm="auto", **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, run in fp32 for bf16 inputs where bf16 GEMMs are slow
    (softmax statistics are fp32 in either kernel; the output is rounded to bf16)."""
    if compute_dtype(q) != torch.bfloat16 or not upcasts_bf16(q.device, bf16_gemm):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
        return _round_bf16(out)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose product goes through `linear`."""

    bf16_gemm = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.bf16_gemm)


def set_bf16_gemm(module: nn.Module, mode: str) -> None:
    """Set the bf16 GEMM mode of every layer under `module` that has one."""
    assert mode in BF16_GEMM_MODES, mode
    for sub in module.modules():
        if hasattr(sub, "bf16_gemm"):
            sub.bf16_gemm = mode
