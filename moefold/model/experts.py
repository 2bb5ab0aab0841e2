"""Routed experts: SwiGLU weights of all local experts stacked per matrix.

Shape legend: R rows (tokens grouped by expert), D model dim, F expert FFN hidden (local shard
under expert tensor parallelism), e local experts.

Two compute paths with identical results:
- the per-expert loop with a hand-written backward (kernels/expert_loop.py, default on CPU):
  weight gradients written in place, only the pre-activations kept. (Indexing `w[i]` under
  autograd would zero-fill a full-size gradient per expert, about 1 s per step on the
  paper-size layer; autograd over `unbind` views stacks a copy: docs/decisions.md);
- `torch.nn.functional.grouped_mm` (default on CUDA, and on CPU for small experts and for
  native bf16 products: see `cpu_runs_grouped_mm`).
`loop_reference` is the plain reference that tests compare both against.
The routing probability scales each row's [R, D] output right after the down projection (not
the [R, F] activation before it): F/D times less elementwise work, and autograd keeps an
[R, D] tensor instead of a scaled [R, F] copy (measured: 625 -> 545 MiB saved activations per
paper-size layer, 2-3% faster). Combine then only sums rows: no weighted copy is made there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moefold.config import grouped_mm_rows_aligned
from moefold.kernels.expert_loop import swiglu_expert_loop
from moefold.kernels.gemm import GemmDtypes, upcasts_bf16

# On CPU, experts whose weight matrices hold at most this many elements (hidden x local FFN
# hidden) run as one torch grouped_mm per matrix instead of the per-expert loop. Small experts
# make the loop's per-expert op overhead (about 25 ops per expert and step) weigh more than its
# GEMM advantage. Measured fwd+bwd of 8 experts (2 threads, Xeon with AVX-512, torch 2.13;
# grouped_mm / loop): hidden 128 x ffn 256 0.78, 256 x 512 0.92, 512 x 256 with 64 experts
# 0.77; 1024 x 512 0.99, 1024 x 1024 1.04, 1024 x 3584 0.97-1.07 (the paper-size layer, where
# the loop is also ahead among the plain-PyTorch baselines). End to end, tiny-moe (128 x 256)
# trains 23% faster.
CPU_GROUPED_MM_MAX_WEIGHTS = 2**18
# Experts of any size take grouped_mm on CPU where their products run as native bf16 GEMMs
# (oneDNN on a CPU with bf16 units; not where bf16 is upcast to fp32 GEMMs). Measured on an AMD
# EPYC with avx512_bf16, loop time / grouped_mm time, paired steps (docs/decisions.md):
# paper-size layer 1.016 and 1.036 at 2 threads, 1.026 at the 1-thread ep 2 shape;
# cpu-moe-1024 bf16 training steps 1.044. In fp32 the loop stays (training 0.983).


def cpu_runs_grouped_mm(hidden: int, ffn_hidden: int, native_bf16: bool = False) -> bool:
    """Whether `moe.grouped_gemm=auto` takes grouped_mm on CPU for experts of this shape
    (`ffn_hidden` local, after etp) whose products are native bf16 GEMMs or not: small or
    native bf16, and with the row strides grouped_mm accepts."""
    aligned = grouped_mm_rows_aligned(hidden, ffn_hidden)
    return aligned and (native_bf16 or hidden * ffn_hidden <= CPU_GROUPED_MM_MAX_WEIGHTS)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class GroupedExperts(nn.Module):
    """e SwiGLU experts; forward takes rows already grouped by expert."""

    def __init__(
        self, num_local_experts: int, hidden: int, ffn_hidden: int, grouped_gemm: str
    ) -> None:
        super().__init__()
        self.num_local_experts = num_local_experts
        self.gate_proj = nn.Parameter(torch.empty(num_local_experts, hidden, ffn_hidden))
        self.up_proj = nn.Parameter(torch.empty(num_local_experts, hidden, ffn_hidden))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, ffn_hidden, hidden))
        self.grouped_gemm = grouped_gemm
        # train.recompute = moe_act (model/recompute.py); the loop path always recomputes it.
        self.recompute_activation = False
        self.bf16_gemm = "auto"  # train.bf16_gemm (kernels/gemm.py)

    def _activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # recompute_activation: backward keeps gate and up, not silu(gate), and recomputes.
        if self.recompute_activation and torch.is_grad_enabled():
            return checkpoint(_swiglu, gate, up, use_reentrant=False)
        return _swiglu(gate, up)

    def use_grouped_mm(self, x_RD: torch.Tensor) -> bool:
        """moe.grouped_gemm: "on", "off", or "auto" = on CUDA, and on CPU for small experts or
        native bf16 products (`cpu_runs_grouped_mm`)."""
        if self.grouped_gemm != "auto":
            return self.grouped_gemm == "on"
        if x_RD.device.type == "cpu":
            _, hidden, ffn_hidden = self.gate_proj.shape
            native_bf16 = self.gemm_dtypes(x_RD).matmul == torch.bfloat16
            return cpu_runs_grouped_mm(hidden, ffn_hidden, native_bf16)
        return x_RD.device.type == "cuda"

    def gemm_dtypes(self, x_RD: torch.Tensor) -> GemmDtypes:
        """The dtypes of this layer's products on `x_RD`: bf16 upcast per train.bf16_gemm."""
        return GemmDtypes.for_input(x_RD, upcasts_bf16(x_RD.device, self.bf16_gemm))

    def forward(
        self, x_RD: torch.Tensor, probs_R: torch.Tensor, tokens_per_expert_e: torch.Tensor
    ) -> torch.Tensor:
        """x [R, D], probs [R], tokens_per_expert [e] (sums to R) -> [R, D]."""
        if self.use_grouped_mm(x_RD):
            return self._forward_grouped_mm(x_RD, probs_R, tokens_per_expert_e)
        # The one device-to-host sync of the expert compute: split sizes must be Python ints.
        counts = tokens_per_expert_e.tolist()
        upcast = upcasts_bf16(x_RD.device, self.bf16_gemm)
        return swiglu_expert_loop(
            x_RD, probs_R, self.gate_proj, self.up_proj, self.down_proj, counts, upcast
        )

    def _forward_grouped_mm(self, x_RD, probs_R, tokens_per_expert_e):
        offsets = torch.cumsum(tokens_per_expert_e, 0).to(torch.int32)
        # bf16 products run as fp32 GEMMs of bf16-rounded operands where upcasting (gemm.py).
        dtypes = self.gemm_dtypes(x_RD)
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            x = dtypes.operand(x_RD)
            gate = F.grouped_mm(x, dtypes.operand(self.gate_proj), offs=offsets)
            up = F.grouped_mm(x, dtypes.operand(self.up_proj), offs=offsets)
            act = dtypes.operand(self._activation(gate, up))
            out = F.grouped_mm(act, dtypes.operand(self.down_proj), offs=offsets)
            return out.to(dtypes.compute) * probs_R.unsqueeze(-1).to(dtypes.compute)


def loop_reference(
    x_RD: torch.Tensor,
    probs_R: torch.Tensor,
    tokens_per_expert_e: torch.Tensor,
    gate_eDF: torch.Tensor,
    up_eDF: torch.Tensor,
    down_eFD: torch.Tensor,
) -> torch.Tensor:
    """Plain per-expert loop with explicit row ranges: the reference for tests."""
    out = torch.zeros_like(x_RD)
    start = 0
    for i, count in enumerate(tokens_per_expert_e.tolist()):
        rows = slice(start, start + count)
        act = F.silu(x_RD[rows] @ gate_eDF[i]) * (x_RD[rows] @ up_eDF[i])
        out[rows] = (act * probs_R[rows, None]) @ down_eFD[i]
        start += count
    return out
