"""MoELayer: router -> dispatcher.dispatch -> experts -> dispatcher.combine (+ shared expert).

Shape legend: B batch, S local sequence, T = B*S local tokens, D model dim, K experts per token,
R rows for the local experts, e local experts.

The layer holds a dispatcher object, never a process group: expert parallelism swaps the
`LocalDispatcher` for a communicating one and keeps only the local experts' weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moefold.config import MoEConfig
from moefold.dispatch.base import TokenDispatcher
from moefold.dispatch.local import LocalDispatcher
from moefold.kernels.gemm import Linear
from moefold.model.experts import GroupedExperts
from moefold.model.router import TopKRouter


class SharedExpert(nn.Module):
    """Dense SwiGLU expert every token passes through, with an optional sigmoid gate."""

    def __init__(self, hidden: int, ffn_hidden: int, gated: bool) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, ffn_hidden, bias=False)
        self.up_proj = Linear(hidden, ffn_hidden, bias=False)
        self.down_proj = Linear(ffn_hidden, hidden, bias=False)
        self.gate = Linear(hidden, 1, bias=False) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x_TD)) * out
        return out


class MoEStepStats:
    """Per-optimizer-step counters of one MoE layer, read and reset by the trainer."""

    def __init__(self) -> None:
        self.dropped: torch.Tensor | float = 0.0  # token-slots dropped by capacity
        self.routed = 0  # token-slots routed

    def add(self, num_dropped: torch.Tensor, num_slots: int) -> None:
        self.dropped = self.dropped + num_dropped.detach()
        self.routed += num_slots


class MoELayer(nn.Module):
    """Sparse MLP replacing the dense MLP of a block."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(hidden, cfg)
        self.experts = GroupedExperts(cfg.num_experts, hidden, cfg.ffn_hidden, cfg.grouped_gemm)
        self.shared_expert = (
            SharedExpert(hidden, cfg.shared_ffn_hidden, cfg.shared_gate)
            if cfg.shared_ffn_hidden
            else None
        )
        # apply_ep swaps in a communicating dispatcher; any TokenDispatcher fits (dispatch/base.py)
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg)
        self.stats = MoEStepStats()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        probs_TK, expert_ids_TK = self.router(x_TD, num_sequences=B)
        rows_RD, probs_R, tokens_per_expert_e, plan = self.dispatcher.dispatch(
            x_TD, probs_TK, expert_ids_TK, num_sequences=B
        )
        expert_out_RD = self.experts(rows_RD, probs_R, tokens_per_expert_e)
        out_TD = self.dispatcher.combine(expert_out_RD, plan).to(x_BSD.dtype)
        if self.training:
            self.stats.add(plan.num_dropped, expert_ids_TK.numel())
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)
        return out_TD.view(B, S, D)
