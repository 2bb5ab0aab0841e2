"""MoE layer (router -> local dispatcher -> experts -> combine) against a brute-force oracle."""

import pytest
import torch
import torch.nn.functional as F

from moefold.config import MoEConfig
from moefold.dispatch.routing import expert_capacity, keep_mask
from moefold.model.moe import MoELayer


def brute_force(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: p * expert(x), skipping dropped slots."""
    B, S, D = x_BSD.shape
    x = x_BSD.reshape(-1, D)
    probs, ids = layer.router(x, num_sequences=B)
    cfg = layer.cfg
    keep = torch.ones_like(ids, dtype=torch.bool)
    if cfg.capacity_factor is not None:
        cap = expert_capacity(x.shape[0], cfg.num_experts, cfg.topk, cfg.capacity_factor)
        keep = keep_mask(ids, probs, cfg.num_experts, cap, cfg.drop_policy, num_sequences=B)
    experts = layer.experts
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(D)
        for k in range(ids.shape[1]):
            if keep[t, k]:
                e = ids[t, k]
                h = F.silu(x[t] @ experts.gate_proj[e]) * (x[t] @ experts.up_proj[e])
                acc = acc + probs[t, k] * (h @ experts.down_proj[e])
        rows.append(acc)
    out = torch.stack(rows)
    if layer.shared_expert is not None:
        out = out + layer.shared_expert(x)
    return out.view(B, S, D)


def build_layer(**overrides) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "topk": 2, "ffn_hidden": 12, **overrides})
    layer = MoELayer(8, cfg)
    torch.manual_seed(1)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.4)
    return layer


CASES = {
    "dropless": {},
    "capacity-probs": {"capacity_factor": 0.75},
    "capacity-position": {"capacity_factor": 0.75, "drop_policy": "position"},
    "capacity-padded": {"capacity_factor": 1.0, "pad_to_capacity": True},
    "sigmoid-shared-gate": {
        "score": "sigmoid",
        "norm_topk_prob": True,
        "shared_ffn_hidden": 6,
        "shared_gate": True,
    },
    "topk1-seq-aux": {"topk": 1, "aux_loss": "seq_aux"},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_moe_layer_matches_brute_force(case):
    layer = build_layer(**CASES[case])
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    got_x = x.grad.clone()
    got_w = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    x.grad = None
    ref = brute_force(layer, x)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-4, atol=1e-6)
    for name, p in layer.named_parameters():
        if name in got_w:
            torch.testing.assert_close(got_w[name], p.grad, rtol=1e-4, atol=1e-6)


def test_dropped_fraction_is_recorded():
    layer = build_layer(capacity_factor=0.5)
    layer(torch.randn(1, 8, 8))
    assert layer.stats.routed == 16
    assert float(layer.stats.dropped) >= 8  # capacity 2 per expert x 4 experts = 8 kept at most
