"""TopKRouter: scores, top-k selection, expert bias, load-balancing and z-loss terms (fp32).

Shape legend: T local tokens, B sequences, S local sequence length, D model dim, E experts,
K experts per token.

Loss conventions (each equals `coeff` for a perfectly balanced router):
- aux:        coeff * E/K * sum_e mean_prob_e * frac_e over one micro-batch, where frac_e is the
              fraction of the micro-batch's token-slots routed to e (Switch / Megatron "aux_loss").
- seq_aux:    the same per sequence, averaged over sequences (DeepSeek "seq_aux_loss").
- global_aux: frac_e is a running fraction over all micro-batches of the global batch processed
              so far (in global micro-batch order), so the load term sees the whole batch.
Statistics of tokens that sit on other ranks (sequence/context parallel shards of the same
micro-batch, or earlier data-parallel micro-batches) come through `self.stats_comm`, which
parallel code replaces; at world size 1 it is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moefold.config import MoEConfig


class AuxLossInjector(torch.autograd.Function):
    """Identity on `x` whose backward also sends `grad_scale` into `aux_loss`.

    The aux loss never joins the LM loss, so it works when only the LM loss is back-propagated
    (pipeline stages that are not last): the gradient of the aux term is injected here.
    """

    @staticmethod
    def forward(ctx, x, aux_loss, grad_scale: float):
        ctx.grad_scale = grad_scale
        ctx.aux_shape = aux_loss.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        grad_aux = torch.full(ctx.aux_shape, ctx.grad_scale, device=grad_x.device)
        return grad_x, grad_aux, None


_STEP_STATE = (
    "step_tokens_per_expert",
    "step_aux_loss",
    "step_z_loss",
    "step_microbatches",
    "_prefix_counts",
)


def _copied(value: torch.Tensor | int) -> torch.Tensor | int:
    return value.clone() if isinstance(value, torch.Tensor) else value


class LocalStatsComm:
    """Reductions of router statistics; the single-rank (identity) version.

    token_group_sum: sum over the ranks that hold parts of the same micro-batch.
    global_prefix:   (counts of global micro-batches up to and including this one in the
                      current micro-step, counts of the whole micro-step) over data parallel.
    """

    def token_group_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def global_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class TopKRouter(nn.Module):
    """Routes each token to K experts; returns fp32 probabilities and expert ids."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.topk = cfg.num_experts, cfg.topk
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        self.register_buffer(
            "expert_bias", torch.zeros(cfg.num_experts), persistent=cfg.expert_bias
        )
        self.stats_comm = LocalStatsComm()
        self.aux_grad_scale = 1.0  # gradient the objective puts on one micro-batch's loss
        self.reset_step_statistics()

    def reset_step_statistics(self) -> None:
        """Called by the trainer at the start of each optimizer step."""
        device = self.weight.device
        self.step_tokens_per_expert = torch.zeros(self.num_experts, device=device)
        self.step_aux_loss = torch.zeros((), device=device)
        self.step_z_loss = torch.zeros((), device=device)
        self.step_microbatches = 0
        self._prefix_counts = torch.zeros(self.num_experts, device=device)

    def step_state(self) -> dict[str, torch.Tensor | int]:
        """A copy of everything a training forward accumulates (the fields set above)."""
        return {name: _copied(getattr(self, name)) for name in _STEP_STATE}

    def load_step_state(self, state: dict[str, torch.Tensor | int]) -> None:
        """Put back a `step_state()` copy (model/recompute.py: a recomputed forward leaves no
        trace and sees the global_aux prefix of the forward it repeats)."""
        for name in _STEP_STATE:
            setattr(self, name, _copied(state[name]))

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.cfg.score == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K] chosen on scores + bias, optionally within the best groups."""
        selection = scores_TE + self.expert_bias if self.cfg.expert_bias else scores_TE
        if self.cfg.num_groups:
            T, E = selection.shape
            grouped = selection.view(T, self.cfg.num_groups, E // self.cfg.num_groups)
            per_group = max(1, self.topk // self.cfg.group_topk)
            group_scores = grouped.topk(min(per_group, grouped.shape[-1]), dim=-1).values.sum(-1)
            best_groups = group_scores.topk(self.cfg.group_topk, dim=-1).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0)
            expert_mask = group_mask.repeat_interleave(E // self.cfg.num_groups, dim=1)
            selection = selection.masked_fill(expert_mask == 0, float("-inf"))
        return selection.topk(self.topk, dim=-1).indices

    def forward(self, x_TD: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] (T = num_sequences * S local tokens) -> (probs [T, K] fp32, ids [T, K])."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits = F.linear(x_TD.float(), self.weight.float())
            scores = self.scores(logits)
            expert_ids = self.select(scores)
            if self.cfg.score == "softmax" and not self.cfg.pre_softmax:
                # Mixtral: softmax over the K chosen logits only.
                probs = torch.softmax(logits.gather(1, expert_ids), dim=-1)
            else:
                probs = scores.gather(1, expert_ids)
                if self.cfg.norm_topk_prob:
                    probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
            probs = probs * self.cfg.scaling_factor
            probs = self._attach_losses(probs, logits, scores, expert_ids, num_sequences)
        return probs, expert_ids

    def _attach_losses(self, probs_TK, logits_TE, scores_TE, expert_ids_TK, num_sequences):
        counts_E = torch.zeros(self.num_experts, device=probs_TK.device).index_add_(
            0, expert_ids_TK.flatten(), torch.ones(expert_ids_TK.numel(), device=probs_TK.device)
        )
        if not self.training:
            return probs_TK
        self.step_tokens_per_expert += counts_E
        self.step_microbatches += 1
        total = torch.zeros((), device=probs_TK.device)
        if self.cfg.aux_loss != "none" and self.cfg.aux_loss_coeff > 0:
            aux = self._balance_loss(scores_TE, expert_ids_TK, counts_E, num_sequences)
            total = total + self.cfg.aux_loss_coeff * aux
            self.step_aux_loss += (self.cfg.aux_loss_coeff * aux).detach()
        if self.cfg.z_loss_coeff > 0:
            num_tokens = self.stats_comm.token_group_sum(
                torch.tensor(float(logits_TE.shape[0]), device=logits_TE.device)
            )
            z = torch.logsumexp(logits_TE, dim=-1).pow(2).sum() / num_tokens
            total = total + self.cfg.z_loss_coeff * z
            self.step_z_loss += (self.cfg.z_loss_coeff * z).detach()
        if total.requires_grad:
            probs_TK = AuxLossInjector.apply(probs_TK, total, self.aux_grad_scale)
        return probs_TK

    def _balance_loss(self, scores_TE, expert_ids_TK, counts_E, num_sequences):
        """This rank's share of the micro-batch's balancing loss (shares sum to the loss)."""
        if self.cfg.score == "sigmoid":
            scores_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        E, K = self.num_experts, self.topk
        if self.cfg.aux_loss == "seq_aux":
            B = num_sequences
            seq_counts_BE = torch.zeros(B, E, device=scores_TE.device)
            seq_ids = expert_ids_TK.view(B, -1)
            seq_counts_BE.scatter_add_(1, seq_ids, torch.ones_like(seq_ids, dtype=torch.float))
            seq_counts_BE = self.stats_comm.token_group_sum(seq_counts_BE)
            seq_len = seq_counts_BE.sum(-1, keepdim=True) / K  # global tokens per sequence
            frac_BE = seq_counts_BE / (seq_len * K)
            mean_prob_BE = scores_TE.view(B, -1, E).sum(1) / seq_len
            return E / K * (mean_prob_BE * frac_BE).sum() / B
        group_counts_E = self.stats_comm.token_group_sum(counts_E)
        num_tokens = group_counts_E.sum() / K
        mean_prob_E = scores_TE.sum(0) / num_tokens
        if self.cfg.aux_loss == "global_aux":
            prefix, microstep_total = self.stats_comm.global_prefix(group_counts_E)
            frac_E = (self._prefix_counts + prefix) / (self._prefix_counts + prefix).sum()
            self._prefix_counts = self._prefix_counts + microstep_total
        else:
            frac_E = group_counts_E / (num_tokens * K)
        return E / K * (mean_prob_E * frac_E).sum()

    @torch.no_grad()
    def update_expert_bias(self, global_tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing: push under-loaded experts up, over-loaded ones down."""
        if not self.cfg.expert_bias:
            return
        error = global_tokens_per_expert.mean() - global_tokens_per_expert
        self.expert_bias += self.cfg.expert_bias_rate * torch.sign(error)
