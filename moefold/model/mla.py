"""Multi-head latent attention (MLA, DeepSeek-V2/V3) and YaRN rotary scaling.

Shape legend: B batch, S sequence (local), D model dim, H query heads, Rq query rank, Rkv
key/value rank, Dn per-head width without rotary, Dr rotary width, Dv value width.

Queries: x -> q_a_proj [Rq] -> RMSNorm -> q_b_proj [H * (Dn + Dr)] (or one q_proj when
q_lora_rank = 0). Keys/values: x -> kv_a_proj [Rkv + Dr]; the Rkv latent -> RMSNorm ->
kv_b_proj [H * (Dn + Dv)] gives each head's key part k_nope and value; the Dr part is ONE
rotary key shared by every head (decoupled RoPE). A head's key is [k_nope, rope(k_rot)], its
query [q_nope, rope(q_rot)]; the softmax scale is (Dn + Dr)^-1/2, times mscale^2 under YaRN
with mscale_all_dim (the reference's scale). The latent norms use eps 1e-6 as the reference.

Rotary layout: moefold rotates the halves of the rotary part (rotate_half). DeepSeek's weights
rotate interleaved pairs (x0, x1), (x2, x3), ...; the HF importer permutes the rotary rows of
q_b_proj / q_proj and kv_a_proj to evens-then-odds, which makes the two equal exactly
(interop/hf.py), and the exporter permutes them back.

Tensor parallelism (parallel/tensor_parallel.py, as Megatron-Core): q_b_proj, kv_b_proj split by
heads (column parallel), o_proj by heads (row parallel); the down projections q_a_proj /
kv_a_proj and the latent norms stay replicated (their gradients are tp partial sums, summed
with the other replicated parameters'). Context parallelism gathers the expanded per-head keys
and values like GQA's (exact; gathering the Rkv + Dr latent instead would move fewer bytes).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moefold.config import ModelConfig
from moefold.kernels import gemm
from moefold.kernels.gemm import Linear
from moefold.kernels.rotary import apply_rotary
from moefold.model.transformer import IdentityRegion, RMSNorm, Rope

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm keep their default eps


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [Dr / 2], cos/sin scale) of YaRN (arXiv 2309.00071) as the HF
    config states it: frequencies that turn fewer than beta_slow times over the original
    context are interpolated (divided by the factor), more than beta_fast extrapolated (kept),
    a linear ramp in between (its ends floored/ceiled, transformers' `truncate`)."""
    dim, base, factor = cfg.rope_dim, cfg.rope_theta, cfg.yarn_factor
    original = cfg.yarn_original_max_positions

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated
    if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        scale = yarn_mscale(factor, cfg.yarn_mscale) / yarn_mscale(factor, cfg.yarn_mscale_all_dim)
    else:
        scale = yarn_mscale(factor)
    return inv_freq, float(scale)


def yarn_tables(positions_S: torch.Tensor, cfg: ModelConfig) -> Rope:
    """cos/sin tables [S, Dr] of YaRN, scaled by its attention factor (HF's convention)."""
    inv_freq, scale = yarn_inv_freq(cfg)
    angles = positions_S.float()[:, None] * inv_freq.to(positions_S.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def softmax_scale_boost(cfg: ModelConfig) -> float:
    """The softmax scale over (Dn + Dr)^-1/2: mscale(factor, mscale_all_dim)^2 under YaRN
    with mscale_all_dim (DeepSeek's reference), else 1."""
    if cfg.yarn_factor > 1 and cfg.yarn_mscale_all_dim:
        return yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2
    return 1.0


def mla_causal_attention(q_BHSDk, k_BHSDk, v_BHSDv, positions_S, bf16_gemm="auto"):
    """Exact causal attention through torch SDPA. Not transformer.causal_attention: its bf16
    CPU kernel (kernels/cpu_attention.py) assumes keys and values share one head width."""
    return gemm.scaled_dot_product_attention(q_BHSDk, k_BHSDk, v_BHSDv, bf16_gemm, is_causal=True)


class MLAttention(nn.Module):
    """Multi-head latent attention; same call as transformer.Attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.heads  # local heads; tensor parallelism divides them
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        q_width = cfg.heads * self.qk_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = Linear(cfg.hidden, q_width, bias=False)
        self.kv_a_proj = Linear(cfg.hidden, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_rank, cfg.heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(cfg.heads * self.v_dim, cfg.hidden, bias=False)
        # The attention functions apply SDPA's default scale qk_dim^-1/2; queries carry the rest.
        self.query_scale = softmax_scale_boost(cfg)
        self.region = IdentityRegion()
        self.bf16_gemm = "auto"
        self.attention_fn = mla_causal_attention  # context parallelism swaps in its own

    def queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))

    def forward(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, rope: Rope) -> torch.Tensor:
        x_BSD = self.region.enter(x_BSD)
        B, S, _ = x_BSD.shape
        H = self.num_heads
        q = self.queries(x_BSD).view(B, S, H, self.qk_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj(x_BSD).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)
        q_rot = apply_rotary(q_rot.contiguous(), *rope)
        k_rot = apply_rotary(k_rot.unsqueeze(1).contiguous(), *rope)  # one key for all heads
        q = torch.cat([q_nope, q_rot], dim=-1)
        if self.query_scale != 1.0:
            q = q * self.query_scale
        k = torch.cat([k_nope, k_rot.expand(B, H, S, self.rope_dim)], dim=-1)
        out = self.attention_fn(q, k, v.contiguous(), positions_S, self.bf16_gemm)
        out = out.transpose(1, 2).reshape(B, S, H * self.v_dim)
        return self.region.exit(self.o_proj(out))
