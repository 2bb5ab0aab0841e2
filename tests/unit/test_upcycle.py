"""Upcycling dense MLPs into experts: layouts, exactness where it holds, measured and bounded
error where it does not, and the `moefold upcycle` command against transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moefold.checkpoint import load_checkpoint
from moefold.cli import main
from moefold.config import JobConfig, ModelConfig, TrainConfig, load_job
from moefold.interop import commands
from moefold.model import build_model
from moefold.model.transformer import Transformer
from moefold.model.upcycle import (
    ROUTER_ORDERS,
    SCALINGS,
    UpcycleSpec,
    activation_scale,
    expand_down_proj,
    expand_in_proj,
    upcycle_model,
    upcycle_tensors,
    upcycled_moe_config,
    upcycled_router,
    weight_scales,
)

# transformers builds Qwen2-MoE's zero-width shared expert (no shared expert) with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

# Odd sizes: hidden 18, 3 heads over 1 kv head, FFN 24 (divisible by G = 1, 2, 4).
DENSE = ModelConfig(
    hidden=18, layers=2, heads=3, kv_heads=1, ffn_hidden=24, vocab_size=37, init_std=0.2
)
# transformers' default grouped_mm experts need 16-byte-aligned strides on CPU (odd sizes fail);
# its eager per-expert loop is the reference anyway.
EAGER = {"experts_implementation": "eager"}


def dense_model(seed: int = 0, tie: bool = False) -> Transformer:
    cfg = ModelConfig(**{**DENSE.__dict__, "tie_embeddings": tie})
    return build_model(JobConfig(model=cfg, train=TrainConfig(seed=seed))).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, DENSE.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed)
    )


def layer_outputs(dense: Transformer, moe: Transformer, seed: int = 2):
    """Dense and MoE MLP outputs of layer 0 on unit-scale inputs [T, D] (RMSNorm-like)."""
    x = torch.randn(1, 64, DENSE.hidden, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return dense.layers["0"].mlp(x)[0], moe.eval().layers["0"].mlp(x)[0], x[0]


# ---- spec and layout ------------------------------------------------------------------------


def test_cli_choices_match_the_upcycle_module():
    assert commands.ROUTER_ORDERS == ROUTER_ORDERS and commands.SCALINGS == SCALINGS


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_experts": 8, "topk": 2, "granularity": 4}, "topk: 2 is not a multiple"),
        ({"num_experts": 6, "topk": 4, "granularity": 4}, "experts: 6 is not a positive multiple"),
        ({"num_experts": 8, "topk": 9}, "topk: must be between"),
        ({"num_experts": 8, "topk": 2, "scaling": "cube"}, "scaling: choose one of"),
    ],
)
def test_spec_rejects_bad_shapes_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UpcycleSpec(**kwargs)


def test_granularity_must_divide_the_dense_ffn_width():
    with pytest.raises(ValueError, match="granularity: the dense FFN width 24"):
        upcycled_moe_config(DENSE, UpcycleSpec(num_experts=10, topk=5, granularity=5))


def test_expert_j_holds_shard_j_mod_g_and_group_routers_tie():
    spec = UpcycleSpec(num_experts=8, topk=4, granularity=4, router_std=0.5)
    F_, D, G = 12, 5, 4
    gate = torch.randn(F_, D)
    down = torch.randn(D, F_)
    experts = expand_in_proj(gate, spec, 1.0)
    experts_down = expand_down_proj(down, spec, 1.0)
    assert experts.shape == (8, D, F_ // G) and experts_down.shape == (8, F_ // G, D)
    for j in range(8):
        shard = slice((j % G) * 3, (j % G + 1) * 3)
        assert torch.equal(experts[j], gate[shard].T)
        assert torch.equal(experts_down[j], down[:, shard].T)
    router = upcycled_router("layers.0.mlp.router.weight", D, spec)
    assert router.shape == (8, D)
    for j in range(8):
        assert torch.equal(router[j], router[(j // G) * G])
    assert not torch.equal(router[0], router[G])
    assert torch.equal(router, upcycled_router("layers.0.mlp.router.weight", D, spec))


def test_activation_scale_and_weight_scales():
    assert activation_scale(UpcycleSpec(num_experts=8, topk=2)) == 1
    assert activation_scale(UpcycleSpec(num_experts=32, topk=8, granularity=4)) == 4
    # E0 * G^2 / K with E0 = 8 coarse experts: 8 * 16 / 8 = 16 = E * G / K.
    spec = UpcycleSpec(num_experts=32, topk=8, granularity=4, router_order="softmax_then_topk")
    assert activation_scale(spec) == 16
    assert weight_scales("swiglu_exact", 16.0) == {"gate": 1.0, "up": 4.0, "down": 4.0}
    assert weight_scales("paper", 8.0) == pytest.approx({"gate": 2.0, "up": 2.0, "down": 2.0})
    assert weight_scales("megatron", 8.0) == weight_scales("paper", 8.0)
    assert weight_scales("megatron", 4.0, "relu") == {"up": 2.0, "down": 2.0}
    assert weight_scales("none", 4.0) == {"gate": 1.0, "up": 1.0, "down": 1.0}
    with pytest.raises(ValueError, match="swiglu_exact needs a SwiGLU"):
        weight_scales("swiglu_exact", 4.0, "relu")


def test_upcycle_tensors_renames_and_passes_everything_else_through():
    dense = dense_model()
    spec = UpcycleSpec(num_experts=4, topk=2, granularity=2)
    out = dict(upcycle_tensors(dense.state_dict().items(), spec))
    moe = Transformer(DENSE, upcycled_moe_config(DENSE, spec))
    assert set(out) == set(moe.state_dict())
    assert torch.equal(
        out["layers.1.attn.q_proj.weight"], dense.state_dict()["layers.1.attn.q_proj.weight"]
    )


# ---- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("router_std", [1e-3, 1.0, 10.0])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_coarse_topk_then_softmax_equals_dense_for_any_router(router_std, tie):
    dense = dense_model(seed=3, tie=tie)
    for seed in range(3):
        spec = UpcycleSpec(num_experts=8, topk=2, router_std=router_std, seed=seed)
        moe = upcycle_model(dense, spec).eval()
        with torch.no_grad():
            # Equal up to the fp32 rounding of the router's K probabilities summing to 1.
            torch.testing.assert_close(moe(tokens()), dense(tokens()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity, experts, topk", [(2, 8, 4), (4, 16, 8), (4, 8, 4)])
@pytest.mark.parametrize("router_std", [1e-3, 3.0])
def test_virtual_groups_with_exact_scaling_equal_dense_for_any_router(
    granularity, experts, topk, router_std
):
    dense = dense_model(seed=4)
    spec = UpcycleSpec(
        num_experts=experts,
        topk=topk,
        granularity=granularity,
        scaling="swiglu_exact",
        router_std=router_std,
        seed=7,
    )
    moe = upcycle_model(dense, spec).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens()), dense(tokens()), rtol=1e-5, atol=1e-5)
    # Top-k selects whole virtual groups: every chosen group appears with all G members.
    x = torch.randn(40, DENSE.hidden)
    _, ids = moe.layers["0"].mlp.router(x, num_sequences=1)
    groups = (ids // granularity).sort(dim=1).values.view(40, -1, granularity)
    assert torch.equal(groups, groups[..., :1].expand_as(groups))


def test_virtual_groups_without_scaling_come_out_scaled_by_one_over_g():
    dense = dense_model(seed=5)
    spec = UpcycleSpec(num_experts=16, topk=8, granularity=4, scaling="none", router_std=2.0)
    y_dense, y_moe, _ = layer_outputs(dense, upcycle_model(dense, spec))
    torch.testing.assert_close(y_moe, y_dense / 4, rtol=1e-5, atol=1e-6)


def _mlp(x, up_FD, down_DF, activation, gate_FD=None):
    h = x @ up_FD.T
    if activation == "relu":
        h = F.relu(h)
    elif activation == "squared_relu":
        h = F.relu(h) ** 2
    else:
        h = F.silu(x @ gate_FD.T) * h
    return h @ down_DF.T


def _reference_moe(x, spec, router, gate, up, down, activation):
    """Per token: sum over the top-k experts of p * expert(x) (float64)."""
    logits = x @ router.T
    if spec.router_order == "topk_then_softmax":
        ids = logits.topk(spec.topk, dim=-1).indices
        probs = torch.softmax(logits.gather(1, ids), dim=-1)
    else:
        scores = torch.softmax(logits, dim=-1)
        ids = scores.topk(spec.topk, dim=-1).indices
        probs = scores.gather(1, ids)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(spec.topk):
            e = ids[t, k]
            g = None if gate is None else gate[e].T
            out[t] += probs[t, k] * _mlp(x[t : t + 1], up[e].T, down[e].T, activation, g)[0]
    return out


@pytest.mark.parametrize(
    "activation, scaling",
    [
        ("relu", "megatron"),
        ("squared_relu", "paper"),
        ("squared_relu", "megatron"),
        ("swiglu", "swiglu_exact"),
    ],
)
def test_scaling_rule_is_exact_for_its_activation(activation, scaling):
    torch.manual_seed(0)
    D, F_, G = 6, 8, 4
    spec = UpcycleSpec(num_experts=8, topk=4, granularity=G, scaling=scaling, router_std=2.0)
    up, down = torch.randn(F_, D, dtype=torch.float64), torch.randn(D, F_, dtype=torch.float64)
    gate = torch.randn(F_, D, dtype=torch.float64) if activation == "swiglu" else None
    scales = weight_scales(scaling, activation_scale(spec), activation)
    experts_gate = None if gate is None else expand_in_proj(gate, spec, scales["gate"])
    router = upcycled_router("r", D, spec).double()
    x = torch.randn(12, D, dtype=torch.float64)
    got = _reference_moe(
        x,
        spec,
        router,
        experts_gate,
        expand_in_proj(up, spec, scales["up"]),
        expand_down_proj(down, spec, scales["down"]),
        activation,
    )
    torch.testing.assert_close(got, _mlp(x, up, down, activation, gate), rtol=1e-12, atol=1e-12)


# ---- measured error where exactness does not hold -------------------------------------------


@pytest.mark.parametrize("granularity, experts, topk", [(1, 8, 2), (4, 16, 8)])
def test_softmax_then_topk_error_is_bounded_by_the_router_logit_range(granularity, experts, topk):
    """Under softmax-then-top-k the MoE output is f * dense with f = mean of exp(logit) over
    the chosen groups / mean over all groups, so 0 <= f - 1 <= exp(max - min logit) - 1."""
    dense = dense_model(seed=6)
    errors = {}
    for router_std in (1e-3, 3e-2):
        spec = UpcycleSpec(
            num_experts=experts,
            topk=topk,
            granularity=granularity,
            router_order="softmax_then_topk",
            router_std=router_std,
        )
        moe = upcycle_model(dense, spec)
        y_dense, y_moe, x = layer_outputs(dense, moe)
        logits = x @ moe.layers["0"].mlp.router.weight.T
        group_exp = logits[:, ::granularity].exp()
        chosen = group_exp.topk(topk // granularity, dim=-1).values
        factor = chosen.mean(-1) / group_exp.mean(-1)
        torch.testing.assert_close(y_moe, factor[:, None] * y_dense, rtol=1e-5, atol=1e-6)
        bound = (logits.max(-1).values - logits.min(-1).values).exp() - 1
        assert bool(((factor - 1) >= -1e-6).all()) and bool(((factor - 1) <= bound + 1e-6).all())
        errors[router_std] = float((y_moe - y_dense).norm() / y_dense.norm())
    assert errors[1e-3] < 0.01 < errors[3e-2] < 0.5, errors


def test_paper_rule_on_swiglu_is_approximate_and_vanishes_for_small_activations():
    """a^(1/3) on gate, up and down scales silu's argument, which is not homogeneous: the error
    is real at unit-scale pre-activations and shrinks where silu is nearly linear (near 0)."""
    spec = UpcycleSpec(num_experts=16, topk=8, granularity=4, scaling="paper")
    errors = []
    for weight_std in (0.3, 0.01):
        dense = dense_model(seed=8)
        with torch.no_grad():
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(dense.layers["0"].mlp, proj).weight.normal_(0, weight_std)
        y_dense, y_moe, _ = layer_outputs(dense, upcycle_model(dense, spec))
        errors.append(float((y_moe - y_dense).norm() / y_dense.norm()))
    assert 0.01 < errors[0] < 0.6 and errors[1] < 0.05, errors


# ---- the command ------------------------------------------------------------------------------


def _save_dense_hf(family: str, path, tie: bool):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(
        vocab_size=37,
        hidden_size=18,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    config = transformers.AutoConfig.for_model(family, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(
    "family, argv, moe_family",
    [
        ("llama", ["--experts", "8", "--topk", "2"], "MixtralForCausalLM"),
        ("llama", ["--experts", "8", "--topk", "4", "--granularity", "4"], "MixtralForCausalLM"),
        ("qwen2", ["--experts", "6", "--topk", "2", "--granularity", "2"], "Qwen2MoeForCausalLM"),
        ("qwen3", ["--experts", "4", "--topk", "2"], "Qwen3MoeForCausalLM"),
    ],
)
def test_upcycle_command_writes_an_hf_moe_with_the_dense_logits(family, argv, moe_family, tmp_path):
    transformers = pytest.importorskip("transformers")
    dense = _save_dense_hf(family, tmp_path / "dense", tie=family == "qwen2")
    out = tmp_path / "moe"
    assert (
        main(
            [
                "upcycle",
                "--dense",
                str(tmp_path / "dense"),
                *argv,
                "--out",
                str(out),
                "--router-std",
                "1.0",
            ]
        )
        == 0
    )
    moe = transformers.AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    assert type(moe).__name__ == moe_family
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_upcycle_to_a_moefold_checkpoint_and_softmax_then_topk_from_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    dense = _save_dense_hf("llama", tmp_path / "dense", tie=False)
    spec = UpcycleSpec(num_experts=8, topk=2, router_order="softmax_then_topk", router_std=0.0)
    ckpt = commands.upcycle(tmp_path / "dense", tmp_path / "ckpt", spec, fmt="moefold")
    job_model = Transformer(*_configs_of(ckpt))
    load_checkpoint(ckpt, job_model, None)
    ids = tokens()
    with torch.no_grad():
        # A zero router is exactly uniform, where softmax-then-top-k scaling is exact.
        torch.testing.assert_close(job_model.eval()(ids), dense(ids).logits, rtol=1e-5, atol=1e-5)
    # Mixtral cannot hold softmax-then-top-k: the HF folder is a bias-free Qwen2-MoE instead.
    commands.upcycle(tmp_path / "dense", tmp_path / "hf", spec, fmt="hf")
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **EAGER).eval()
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def _configs_of(ckpt):
    job = load_job(str(ckpt / "config.toml"))
    return job.model, job.moe


def test_upcycle_command_reports_a_topk_that_splits_groups(tmp_path, capsys):
    _save_dense_hf("llama", tmp_path / "dense", tie=False)
    code = main(
        [
            "upcycle",
            "--dense",
            str(tmp_path / "dense"),
            "--experts",
            "8",
            "--topk",
            "2",
            "--granularity",
            "4",
            "--out",
            str(tmp_path / "moe"),
        ]
    )
    assert code == 2
    assert "topk: 2 is not a multiple of granularity=4" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def test_router_std_zero_is_uniform():
    spec = UpcycleSpec(num_experts=4, topk=2, router_std=0.0)
    assert torch.count_nonzero(upcycled_router("x", 3, spec)) == 0
    assert math.isclose(activation_scale(spec), 1.0)
