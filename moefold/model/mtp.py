"""Multi-token prediction (DeepSeek-V3, arXiv:2412.19437 section 2.2; model.mtp_depths).

Depth d (1..D) predicts token i+1+d at position i. It sees the previous depth's hidden state
h^{d-1}_i (h^0: the main model's last block output, before the final norm) and the embedding
of token i+d, RMS-normalises each (`hnorm`, `enorm`), concatenates [embedding; hidden] (the
order of DeepSeek's stored `eh_proj`), projects 2D -> D (`eh_proj`), runs one block of the
model's kind (MLA/GQA, MoE or dense as layer L+d-1 would be), and its own final norm
(`final_norm`, HF `shared_head.norm`) feeds the LM head shared with the main model. Its loss
is the paper's: per depth the summed cross entropy of the valid positions over all T
positions of the sequence (the last d positions have no target), averaged over depths and
weighted by train.mtp_loss_coeff in training only; generation uses the main head.

Token ids travel as one tensor [B, S, 1+D]: column k holds the id at global position p + k for
each local position p (k = 0 the model input), the targets likewise hold the label at p + k.
`mtp_shard` builds both from the full micro-batch, so under context and sequence
parallelism the shifted ids that lie in another rank's shard are already here; the MTP
embeddings are made on the first pipeline stage and carried to the last beside the hidden
state (moefold/model/transformer.py forward_layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moefold.config import ModelConfig, MoEConfig
from moefold.kernels.gemm import Linear

IGNORE = -100  # label of positions without a target (cross_entropy's ignore_index)


class MTPDepth(nn.Module):
    """One prediction depth; `depth` counts from 0, its block is model layer L + depth."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, depth: int) -> None:
        super().__init__()
        from moefold.model.transformer import Block, RMSNorm  # transformer.py builds on this

        self.enorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden, cfg.hidden, bias=False)
        self.block = Block(cfg, moe, cfg.layers + depth)
        self.final_norm = RMSNorm(cfg.hidden, cfg.norm_eps)

    def forward(self, h_BSD, embed_BSD, positions_S, rope) -> torch.Tensor:
        """The depth's hidden state h^d (before final_norm)."""
        x = self.eh_proj(torch.cat([self.enorm(embed_BSD), self.hnorm(h_BSD)], dim=-1))
        return self.block(x, positions_S, rope)


def mtp_shard(
    batch_BS1: torch.Tensor, local_S: torch.Tensor, depths: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, s, 1+D], labels [B, s, 1+D]) of this rank's positions `local_S` of a micro-batch
    [B, S+1]: column k the id / label at position p + k (ids past the end are 0 and their
    labels IGNORE; a depth's loss ignores them, its causal block never lets them reach an
    earlier position)."""
    seq_len = batch_BS1.shape[1] - 1
    shift = torch.arange(depths + 1, device=local_S.device)
    at = local_S[:, None] + shift[None, :]  # [s, 1+D] input positions
    ids = batch_BS1[:, at.clamp(max=seq_len)]
    ids = ids.masked_fill(at > seq_len, 0)
    labels = batch_BS1[:, (at + 1).clamp(max=seq_len)]
    labels = labels.masked_fill(at + 1 > seq_len, IGNORE)
    return ids, labels


def mtp_depth_losses(logits_BSKV: torch.Tensor, labels_BSK: torch.Tensor) -> torch.Tensor:
    """[D] per-depth losses: summed cross entropy of the valid positions over all positions
    (the paper's 1/T), so every rank's share of a sequence divides by the same count."""
    losses = []
    for k in range(1, logits_BSKV.shape[2]):
        labels = labels_BSK[..., k].flatten()
        total = F.cross_entropy(
            logits_BSKV[:, :, k].float().flatten(0, 1), labels, ignore_index=IGNORE, reduction="sum"
        )
        losses.append(total / labels.numel())
    return torch.stack(losses)
