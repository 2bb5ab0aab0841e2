"""Decoder-only transformer with single-device semantics; MoE layers plug in as the MLP.

Shape legend: B batch, S sequence (local), D model dim, F FFN hidden, H query heads,
G key/value heads, Dh head dim, V vocabulary.

Parallelism is applied afterwards by `moefold.parallel.apply_*`, which shard weights and set the
`region` objects below. At world size 1 every region is the identity, so this file is the whole
single-device model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moefold.config import ModelConfig, MoEConfig
from moefold.kernels import cpu_attention, gemm
from moefold.kernels.gemm import Linear
from moefold.kernels.rotary import apply_rotary
from moefold.model.moe import MoELayer
from moefold.model.mtp import MTPDepth
from moefold.model.recompute import RECOMPUTE_MODES, recomputed


class IdentityRegion:
    """Enter/exit of a tensor-parallel region; parallel code swaps in communicating versions.

    `enter` turns the block input (sequence-sharded under sequence parallelism) into what the
    column-parallel projections need; `exit` reduces row-parallel partial sums back.
    """

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return x


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


Rope = tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin) tables [S, Dh] of the local tokens


def rotary_tables(positions_S: torch.Tensor, head_dim: int, theta: float) -> Rope:
    """cos/sin tables [S, Dh] for the given (global) positions, HF "rotate_half" convention."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions_S.device) / head_dim
    )
    angles = positions_S.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def model_rotary_tables(positions_S: torch.Tensor, cfg: ModelConfig) -> Rope:
    """The model's tables: plain RoPE over `cfg.rope_dim`, or YaRN's (model/mla.py)."""
    if cfg.yarn_factor != 1.0:
        from moefold.model.mla import yarn_tables

        return yarn_tables(positions_S, cfg)
    return rotary_tables(positions_S, cfg.rope_dim, cfg.rope_theta)


def causal_attention(q_BHSDh, k_BGSDh, v_BGSDh, positions_S, bf16_gemm="auto") -> torch.Tensor:
    """Exact causal attention with grouped KV heads; the sequence is in order. torch SDPA, but
    bf16 on a CPU with bf16 GEMMs runs kernels/cpu_attention.py (2.5-4x faster there)."""
    on_native_bf16_cpu = (
        q_BHSDh.device.type == "cpu"
        and gemm.compute_dtype(q_BHSDh) == torch.bfloat16
        and not gemm.upcasts_bf16(q_BHSDh.device, bf16_gemm)
    )
    if on_native_bf16_cpu:
        return cpu_attention.causal_attention(q_BHSDh, k_BGSDh, v_BGSDh, torch.bfloat16)
    return gemm.scaled_dot_product_attention(
        q_BHSDh, k_BGSDh, v_BGSDh, bf16_gemm, is_causal=True, enable_gqa=True
    )


class SequencePositions:
    """Which positions of the full sequence this rank's tokens hold.

    Context parallelism (cp > 1) gives rank r the chunks r and 2*cp-1-r of 2*cp equal chunks,
    so causal work is even across ranks; sequence parallelism then gives tp rank t the t-th
    contiguous slice of that. `attention(S)` are the positions attention sees (the cp-local
    sequence, after the sequence-parallel all-gather); `local(S)` the indices of this rank's
    tokens in the full sequence of length S.
    """

    def __init__(self, cp_size: int = 1, cp_rank: int = 0, tp_size: int = 1, tp_rank: int = 0):
        self.cp_size, self.cp_rank, self.tp_size, self.tp_rank = cp_size, cp_rank, tp_size, tp_rank

    def attention(self, seq_len: int, device=None) -> torch.Tensor:
        if self.cp_size == 1:
            return torch.arange(seq_len, device=device)
        chunk = seq_len // (2 * self.cp_size)
        first = torch.arange(self.cp_rank * chunk, (self.cp_rank + 1) * chunk, device=device)
        mirror = 2 * self.cp_size - 1 - self.cp_rank
        return torch.cat([first, torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)])

    def local(self, seq_len: int, device=None) -> torch.Tensor:
        visible = self.attention(seq_len, device)
        width = visible.numel() // self.tp_size
        return visible[self.tp_rank * width : (self.tp_rank + 1) * width]


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        self.num_heads = cfg.heads  # local heads; tensor parallelism divides them
        self.num_kv_heads = cfg.kv_heads
        self.q_proj = Linear(cfg.hidden, cfg.heads * self.head_dim, bias=cfg.attn_bias)
        self.k_proj = Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.v_proj = Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.o_proj = Linear(cfg.heads * self.head_dim, cfg.hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.region = IdentityRegion()
        self.bf16_gemm = "auto"  # train.bf16_gemm (kernels/gemm.py), also for the attention
        # Context parallelism replaces this with an exact cross-rank attention.
        self.attention_fn = causal_attention

    def forward(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, rope: Rope) -> torch.Tensor:
        x_BSD = self.region.enter(x_BSD)
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = self.attention_fn(q, k, v, positions_S, self.bf16_gemm)
        out = out.transpose(1, 2).reshape(B, S, -1)
        return self.region.exit(self.o_proj(out))


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, ffn_hidden, bias=False)
        self.up_proj = Linear(hidden, ffn_hidden, bias=False)
        self.down_proj = Linear(ffn_hidden, hidden, bias=False)
        self.region = IdentityRegion()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.region.enter(x)
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.region.exit(out)


class Block(nn.Module):
    """Pre-norm transformer block; the MLP is dense or MoE."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        if cfg.mla:
            from moefold.model.mla import MLAttention  # mla.py builds on this file's parts

            self.attn: nn.Module = MLAttention(cfg)
        else:
            self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        if moe.is_moe_layer(layer_index):
            self.mlp: nn.Module = MoELayer(cfg.hidden, moe)
        else:
            self.mlp = DenseMLP(cfg.hidden, cfg.ffn_hidden)
        self.recompute = "none"  # train.recompute, set by Transformer.set_recompute

    def forward(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, rope: Rope) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return recomputed(self._forward, x_BSD, positions_S, rope, region=self)
        return self._forward(x_BSD, positions_S, rope)

    def _forward(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, rope: Rope) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), positions_S, rope)
        if self.recompute == "moe" and isinstance(self.mlp, MoELayer) and torch.is_grad_enabled():
            return x_BSD + recomputed(self._mlp, x_BSD, region=self.mlp)
        return x_BSD + self._mlp(x_BSD)

    def _mlp(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(x_BSD))


class Transformer(nn.Module):
    """Embedding -> blocks -> norm -> LM head.

    Blocks live in a ModuleDict keyed "0".."L-1" so parameter names survive pipeline splits;
    a pipeline stage deletes what it does not own (embedding, blocks, norm/head become None).
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig) -> None:
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleDict({str(i): Block(cfg, moe, i) for i in range(cfg.layers)})
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else Linear(cfg.hidden, cfg.vocab_size, bias=False)
        )
        # Multi-token prediction depths (model/mtp.py), on the last pipeline stage.
        self.mtp = (
            nn.ModuleDict({str(d): MTPDepth(cfg, moe, d) for d in range(cfg.mtp_depths)})
            if cfg.mtp_depths
            else None
        )
        self.bf16_gemm = "auto"  # train.bf16_gemm for the (possibly tied) LM head
        # Which positions this rank's tokens hold; context/sequence parallelism replace it.
        self.positions = SequencePositions()

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def set_bf16_gemm(self, mode: str) -> None:
        """How bf16 products run (train.bf16_gemm, see moefold/kernels/gemm.py)."""
        gemm.set_bf16_gemm(self, mode)

    def set_recompute(self, mode: str) -> None:
        """Which activations backward recomputes instead of keeping (train.recompute, see
        moefold/model/recompute.py)."""
        assert mode in RECOMPUTE_MODES, mode
        blocks: list = list(self.layers.values())
        blocks += [depth.block for depth in (self.mtp or {}).values()]
        for block in blocks:
            block.recompute = mode
            if isinstance(block.mlp, MoELayer):
                block.mlp.experts.recompute_activation = mode == "moe_act"

    def forward(
        self, tokens_BS: torch.Tensor, positions_S: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, S] (ids, or hidden [B, S, D] on a non-first pipeline stage) -> logits
        [B, S, V] (or hidden on a non-last stage). `positions_S` are the global positions of the
        local tokens (context parallelism passes its chunks' positions); default 0..S-1.
        With MTP, ids [B, S, 1+D] (model/mtp.py mtp_shard) give logits [B, S, 1+D, V]: the
        main head's, then each depth's."""
        return self.forward_layers(tokens_BS, list(self.layers), positions_S, first=True, last=True)

    def forward_layers(
        self,
        x: torch.Tensor,
        layer_names: list[str],
        positions_S: torch.Tensor | None = None,
        first: bool = True,
        last: bool = True,
    ) -> torch.Tensor:
        """Run the given blocks; `first` adds the embedding, `last` the norm and LM head.
        Pipeline stages call this with their own slice of the layers. Under MTP the depths'
        embeddings ride beside the hidden state between stages ([B, S, (1+D) * hidden])."""
        if positions_S is None:
            p = self.positions
            positions_S = p.attention(x.shape[1] * p.tp_size * p.cp_size, x.device)
        mtp_embeds = None  # [B, S, D, hidden]: embeddings of the ids at p + 1 .. p + D
        if first and x.dim() == 3:
            x, mtp_embeds = self.embed(x[..., 0]), self.embed(x[..., 1:])
        elif first:
            x = self.embed(x)
        elif x.shape[-1] > self.cfg.hidden:
            x, carried = x[..., : self.cfg.hidden], x[..., self.cfg.hidden :]
            mtp_embeds = carried.unflatten(-1, (-1, self.cfg.hidden))
        # Every block rotates by the same tables: made once per forward, as HF's models do.
        rope = model_rotary_tables(positions_S, self.cfg)
        for name in layer_names:
            x = self.layers[name](x, positions_S, rope)
        if not last:
            return x if mtp_embeds is None else torch.cat([x, mtp_embeds.flatten(-2)], dim=-1)
        logits = self.head(self.norm(x))
        if mtp_embeds is None:
            return logits
        assert self.mtp is not None, "MTP ids given to a model without model.mtp_depths"
        depth_logits = [logits]
        for d, depth in enumerate(self.mtp.values()):
            x = depth(x, mtp_embeds[:, :, d], positions_S, rope)
            depth_logits.append(self.head(depth.final_norm(x)))
        return torch.stack(depth_logits, dim=2)

    def head(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """The LM head (the input embedding when tied), shared by the MTP depths."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return gemm.linear(x_BSD, weight, bf16_gemm=self.bf16_gemm)
