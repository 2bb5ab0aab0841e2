"""MLA (model/mla.py): parameter and FLOP counts against the built module, and the config
rules that keep it well-formed."""

import pytest
import torch

from moefold.config import ConfigError, ModelConfig, MoEConfig
from moefold.model.size import count_parameters, flops_per_token
from moefold.model.transformer import Transformer

BASE = dict(hidden=24, layers=2, heads=3, kv_heads=3, ffn_hidden=20, vocab_size=31)
MLA = dict(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)


@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_parameter_count_equals_the_built_model(q_lora_rank):
    model_cfg = ModelConfig(**BASE, **MLA, q_lora_rank=q_lora_rank)
    moe_cfg = MoEConfig(
        num_experts=4,
        topk=2,
        ffn_hidden=6,
        first_dense_layers=1,
        shared_ffn_hidden=6,
        score="sigmoid",
        expert_bias=True,
    )
    model = Transformer(model_cfg, moe_cfg)
    built = sum(p.numel() for p in model.parameters())
    assert count_parameters(model_cfg, moe_cfg).total == built
    projections = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".attn." in n and not n.endswith("norm.weight")
    )
    assert count_parameters(model_cfg, moe_cfg).attention == projections


def test_flops_by_hand():
    # H=3, D=24, Rkv=8, Dn=6, Dr=4, Dv=5, Rq=0, S=10, one layer's attention:
    # q 24*3*10=720, kv_a 24*12=288, kv_b 8*3*11=264, o 3*5*24=360 -> 1632 weights, 3264 FLOPs;
    # scores S*H*(Dn+Dr+Dv) = 10*3*15 = 450.
    model_cfg = ModelConfig(**{**BASE, "layers": 1}, **MLA)
    dense = 2 * 3 * 24 * 20
    head = 2 * 24 * 31
    assert flops_per_token(model_cfg, MoEConfig(), 10, training=False) == 3264 + 450 + dense + head


def test_mla_forward_is_causal():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **MLA, q_lora_rank=10), MoEConfig()).eval()
    ids = torch.randint(0, 31, (1, 9))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 31
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize(
    "extra, field",
    [
        (dict(qk_rope_head_dim=3), "model.qk_rope_head_dim"),
        (dict(v_head_dim=0), "model.v_head_dim"),
        (dict(kv_heads=1, heads=3), "model.kv_heads"),
        (dict(qk_norm=True), "model.qk_norm"),
    ],
)
def test_mla_config_rules(extra, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**BASE, **MLA, **extra})


def test_bf16_forward_runs_and_tracks_fp32():
    # Values (Dv = 5) narrower than keys (Dn + Dr = 10): the attention must not take the bf16
    # CPU kernel that assumes one width.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **MLA), MoEConfig()).eval()
    ids = torch.randint(0, 31, (2, 9))
    with torch.no_grad():
        want = model(ids)
        got = model.to(torch.bfloat16)(ids).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)
