"""TopKRouter: scores, top-k selection, expert bias, load-balancing and z-loss terms.

Shape legend: T local tokens, B sequences, S local sequence length, D model dim, E experts,
K experts per token.

Routing follows Megatron-Core's `TopKRouter` (0.16.1) for every option the two share; the
parity suite (tests/parity/) runs Megatron's own functions on the same logits. Selection:
- softmax after top-k (Mixtral): groups and top-k on the raw logits, softmax over the K chosen;
- pre-softmax: groups and top-k on softmax over all experts;
- sigmoid: groups and top-k on sigmoid scores (+ expert bias), probabilities the unbiased
  scores, renormalised over the K when `norm_topk_prob` (Megatron always renormalises, K > 1).
Documented differences (docs/config.md, "Routing and Megatron-Core"): `norm_topk_prob` with
pre-softmax, expert bias with softmax scores, the group score when K < group_topk, a true
fp64 softmax under `router_dtype=fp64`, and jitter only in training.

Loss conventions (each equals `coeff` for a perfectly balanced router; Megatron's
`switch_load_balancing_loss_func`: coeff * E / (K * T^2) * sum_e P_e * c_e):
- aux:        coeff * E * sum_e mean_prob_e * frac_e over one micro-batch, where frac_e is the
              fraction of the micro-batch's token-slots routed to e (Switch / Megatron "aux_loss").
- seq_aux:    the same per sequence, averaged over sequences (DeepSeek "seq_aux_loss").
- global_aux: frac_e is a running fraction over all micro-batches of the global batch processed
              so far (in global micro-batch order), so the load term sees the whole batch.
As in Megatron, the load c_e of every balancing loss is counted on an unbiased, ungrouped top-k
of the scores (softmax, or sigmoid normalised over the experts), not on the selection that
expert bias or group limits produce. Statistics of tokens that sit on other ranks
(sequence/context parallel shards of the same micro-batch, or earlier data-parallel
micro-batches) come through `self.stats_comm`, which parallel code replaces; at world size 1 it
is the identity.
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
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        grad_aux = torch.full(
            ctx.aux_shape, ctx.grad_scale, dtype=ctx.aux_dtype, device=grad_x.device
        )
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

    def group_limited_topk(self, selection_TE: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K]: top-k of `selection`, optionally only inside the best groups.

        A group scores the sum of its best K // group_topk values (Megatron's rule); where that
        is 0 (K < group_topk) moefold scores a group by its best value instead of by 0.
        `group_score_topk` fixes the count instead (DeepSeek-V3 and transformers sum the best 2).
        With groups aligned to expert-parallel ranks this is DeepSeek-V3's node-limited routing
        (docs/deepseek.md): a token's experts sit on at most group_topk groups' ranks.
        """
        if not self.cfg.num_groups:
            return selection_TE.topk(self.topk, dim=-1).indices
        T, E = selection_TE.shape
        G = self.cfg.num_groups
        grouped = selection_TE.view(T, G, E // G)
        megatron_rule = min(max(1, self.topk // self.cfg.group_topk), E // G)
        per_group = self.cfg.group_score_topk or megatron_rule
        group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)
        best_groups = group_scores.topk(self.cfg.group_topk, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(1, best_groups, True)
        expert_mask = group_mask.repeat_interleave(E // G, dim=1)
        masked = selection_TE.masked_fill(~expert_mask, float("-inf"))
        return masked.topk(self.topk, dim=-1).indices

    def route(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, K] in the logits' dtype, expert ids [T, K]) from router logits."""
        cfg = self.cfg
        if cfg.score == "sigmoid":
            scores = torch.sigmoid(logits_TE)
        elif cfg.pre_softmax or cfg.expert_bias:
            scores = torch.softmax(logits_TE, dim=-1)
        else:
            # Mixtral / Megatron: select on the logits, softmax over the K chosen only.
            expert_ids = self.group_limited_topk(logits_TE)
            probs = torch.softmax(logits_TE.gather(1, expert_ids), dim=-1)
            return probs * cfg.scaling_factor, expert_ids
        selection = scores + self.expert_bias.to(scores.dtype) if cfg.expert_bias else scores
        expert_ids = self.group_limited_topk(selection)
        probs = scores.gather(1, expert_ids)
        if cfg.expert_bias and cfg.score == "softmax" and not cfg.pre_softmax:
            # Expert bias on softmax scores (moefold only: Megatron allows bias with sigmoid);
            # probabilities stay those of softmax after top-k.
            probs = torch.softmax(logits_TE.gather(1, expert_ids), dim=-1)
        elif cfg.norm_topk_prob and self.topk > 1:
            probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
        return probs * cfg.scaling_factor, expert_ids

    def jitter(self, x_TD: torch.Tensor, num_sequences: int) -> torch.Tensor:
        """Multiplicative input noise U(1-eps, 1+eps) (Switch Transformer), in x's dtype, drawn
        from torch's default generator as Megatron's `apply_input_jitter` draws it: one
        [S, B, D] draw (Megatron's token order), so a seed gives both the same noise."""
        eps = self.cfg.input_jitter
        T, D = x_TD.shape
        low = torch.tensor(1.0 - eps, dtype=x_TD.dtype, device=x_TD.device)
        high = torch.tensor(1.0 + eps, dtype=x_TD.dtype, device=x_TD.device)
        noise_SBD = torch.rand(
            T // num_sequences, num_sequences, D, dtype=x_TD.dtype, device=x_TD.device
        )
        noise_TD = noise_SBD.transpose(0, 1).reshape(T, D)
        return x_TD * (low + noise_TD * (high - low))

    @property
    def router_dtype(self) -> torch.dtype:
        return torch.float64 if self.cfg.router_dtype == "fp64" else torch.float32

    def forward(self, x_TD: torch.Tensor, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] (T = num_sequences * S local tokens) -> (probs [T, K] fp32, ids [T, K])."""
        if self.training and self.cfg.input_jitter > 0:
            x_TD = self.jitter(x_TD, num_sequences)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            dtype = self.router_dtype
            logits = F.linear(x_TD.to(dtype), self.weight.to(dtype))
            probs, expert_ids = self.route(logits)
            probs = self._attach_losses(probs, logits, expert_ids, num_sequences)
        return probs.float(), expert_ids

    def _attach_losses(self, probs_TK, logits_TE, expert_ids_TK, num_sequences):
        device = probs_TK.device
        counts_E = torch.zeros(self.num_experts, device=device).index_add_(
            0, expert_ids_TK.flatten(), torch.ones(expert_ids_TK.numel(), device=device)
        )
        if not self.training:
            return probs_TK
        self.step_tokens_per_expert += counts_E
        self.step_microbatches += 1
        total = torch.zeros((), dtype=logits_TE.dtype, device=device)
        if self.cfg.aux_loss != "none" and self.cfg.aux_loss_coeff > 0:
            aux = self._balance_loss(logits_TE, num_sequences)
            total = total + self.cfg.aux_loss_coeff * aux
            self.step_aux_loss += (self.cfg.aux_loss_coeff * aux).detach().float()
        if self.cfg.z_loss_coeff > 0:
            num_tokens = self.stats_comm.token_group_sum(
                torch.tensor(float(logits_TE.shape[0]), device=device)
            )
            z = torch.logsumexp(logits_TE, dim=-1).pow(2).sum() / num_tokens
            total = total + self.cfg.z_loss_coeff * z
            self.step_z_loss += (self.cfg.z_loss_coeff * z).detach().float()
        if total.requires_grad:
            probs_TK = AuxLossInjector.apply(probs_TK, total, self.aux_grad_scale)
        return probs_TK

    def balance_scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [T, E], their unbiased ungrouped top-k ids [T, K]) for the balancing loss."""
        if self.cfg.score == "sigmoid":
            scores = torch.sigmoid(logits_TE)
            scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        else:
            scores = torch.softmax(logits_TE, dim=-1)
        return scores, scores.detach().topk(self.topk, dim=-1).indices

    def _balance_loss(self, logits_TE, num_sequences):
        """This rank's share of the micro-batch's balancing loss (shares sum to the loss)."""
        scores_TE, ids_TK = self.balance_scores(logits_TE)
        E, K = self.num_experts, self.topk
        device = scores_TE.device
        if self.cfg.aux_loss == "seq_aux":
            B = num_sequences
            seq_counts_BE = torch.zeros(B, E, device=device)
            seq_ids = ids_TK.reshape(B, -1)
            seq_counts_BE.scatter_add_(1, seq_ids, torch.ones_like(seq_ids, dtype=torch.float))
            seq_counts_BE = self.stats_comm.token_group_sum(seq_counts_BE).to(scores_TE.dtype)
            seq_len = seq_counts_BE.sum(-1, keepdim=True) / K  # global tokens per sequence
            frac_BE = seq_counts_BE / (seq_len * K)
            mean_prob_BE = scores_TE.view(B, -1, E).sum(1) / seq_len
            return E * (mean_prob_BE * frac_BE).sum() / B
        counts_E = torch.zeros(E, device=device).index_add_(
            0, ids_TK.flatten(), torch.ones(ids_TK.numel(), device=device)
        )
        group_counts_E = self.stats_comm.token_group_sum(counts_E)
        num_tokens = group_counts_E.sum() / K
        mean_prob_E = scores_TE.sum(0) / num_tokens.to(scores_TE.dtype)
        if self.cfg.aux_loss == "global_aux":
            prefix, microstep_total = self.stats_comm.global_prefix(group_counts_E)
            frac_E = (self._prefix_counts + prefix) / (self._prefix_counts + prefix).sum()
            self._prefix_counts = self._prefix_counts + microstep_total
        else:
            frac_E = group_counts_E / (num_tokens * K)
        return E * (mean_prob_E * frac_E.to(scores_TE.dtype)).sum()

    @torch.no_grad()
    def update_expert_bias(self, global_tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing: push under-loaded experts up, over-loaded ones down."""
        if not self.cfg.expert_bias:
            return
        error = global_tokens_per_expert.mean() - global_tokens_per_expert
        self.expert_bias += self.cfg.expert_bias_rate * torch.sign(error)
