"""Routed experts: SwiGLU weights of all local experts stacked per matrix.

Shape legend: R rows (tokens grouped by expert), D model dim, F expert FFN hidden (local shard
under expert tensor parallelism), e local experts.

Two compute paths with identical results:
- per-expert loop over `unbind` views (default on CPU). `unbind`'s backward stacks the expert
  gradients once; indexing `w[i]` instead would zero-fill a full-size gradient per expert,
  which measured about 1 s per step slower on the paper-size layer (shared/BASELINES.md);
- `torch.nn.functional.grouped_mm` (default on CUDA; measured slower than the loop on CPU).
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
        self.recompute_activation = False  # train.recompute = moe_act (model/recompute.py)

    def _activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # recompute_activation: backward keeps gate and up, not silu(gate), and recomputes.
        if self.recompute_activation and torch.is_grad_enabled():
            return checkpoint(_swiglu, gate, up, use_reentrant=False)
        return _swiglu(gate, up)

    def use_grouped_mm(self, x_RD: torch.Tensor) -> bool:
        if self.grouped_gemm == "auto":
            return x_RD.device.type == "cuda"
        return self.grouped_gemm == "on"

    def forward(
        self, x_RD: torch.Tensor, probs_R: torch.Tensor, tokens_per_expert_e: torch.Tensor
    ) -> torch.Tensor:
        """x [R, D], probs [R], tokens_per_expert [e] (sums to R) -> [R, D]."""
        if self.use_grouped_mm(x_RD):
            return self._forward_grouped_mm(x_RD, probs_R, tokens_per_expert_e)
        # The one device-to-host sync of the expert compute: split sizes must be Python ints.
        counts = tokens_per_expert_e.tolist()
        outputs = []
        weights = zip(self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0))
        for x, p, (gate, up, down) in zip(x_RD.split(counts), probs_R.split(counts), weights):
            act = self._activation(x @ gate, x @ up)
            outputs.append((act @ down) * p.unsqueeze(-1).to(act.dtype))
        return torch.cat(outputs) if outputs else x_RD.new_zeros(0, x_RD.shape[-1])

    def _forward_grouped_mm(self, x_RD, probs_R, tokens_per_expert_e):
        offsets = torch.cumsum(tokens_per_expert_e, 0).to(torch.int32)
        device_type = x_RD.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else x_RD.dtype
        with torch.autocast(device_type=x_RD.device.type, enabled=False):
            x = x_RD.to(dtype)
            gate = F.grouped_mm(x, self.gate_proj.to(dtype), offs=offsets)
            up = F.grouped_mm(x, self.up_proj.to(dtype), offs=offsets)
            out = F.grouped_mm(self._activation(gate, up), self.down_proj.to(dtype), offs=offsets)
            return out * probs_R.unsqueeze(-1).to(dtype)


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
