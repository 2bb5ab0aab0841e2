"""The token dispatcher contract: dispatch tokens to local experts, combine their outputs back.

Shape legend: T local tokens, D model dim, K experts per token, R rows for the local experts,
e local experts.

    expert_input_RD, expert_probs_R, tokens_per_expert_e, plan = dispatcher.dispatch(
        hidden_TD, probs_TK, expert_ids_TK, num_sequences)
    out_TD = dispatcher.combine(expert_output_RD, plan)

`num_sequences` says how many batch-major sequences the T tokens hold (the position drop
policy ranks tokens by position across them). Rows are grouped by local expert in ascending
order. `plan` is a frozen per-call record, so nothing is kept on the dispatcher between the
two calls (micro-batches and pipeline interleaving stay safe). `combine` sums each token's
rows; the experts have already weighted each row by its routing probability. Every
dispatcher must match `LocalDispatcher`: the same rows reach each expert (up to order) and
outputs and gradients agree.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TokenDispatcher(Protocol):
    def dispatch(
        self,
        hidden_TD: torch.Tensor,
        probs_TK: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        num_sequences: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, expert_output_RD: torch.Tensor, plan: Any) -> torch.Tensor: ...
