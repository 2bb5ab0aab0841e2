"""DeepseekV3ForCausalLM interop: moefold's MLA + node-limited MoE logits equal transformers'
(fp32, atol 1e-5) over random small configs, with and without YaRN, q compression, dense first
layers, shared experts and MTP layers in the folder; round trips are exact both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moefold.cli import main
from moefold.interop import hf

transformers = pytest.importorskip("transformers")
EAGER = {"experts_implementation": "eager"}
# n_shared_experts = 0 builds a zero-width shared MLP, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
VOCAB = 61


def random_config(seed: int, mscale_all_dim: float | None = None) -> dict:
    """A random small DeepSeek-V3 config; YaRN when `mscale_all_dim` is given (or by chance)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (), generator=gen))]

    groups = pick(1, 2, 4)
    per_group = pick(2, 3)
    experts = groups * per_group
    topk_group = pick(*range(1, groups + 1))
    topk = pick(*range(2, min(topk_group * per_group, 4) + 1))
    layers, heads = pick(2, 3), pick(2, 3, 4)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=pick(24, 32),
        intermediate_size=pick(20, 36),
        moe_intermediate_size=pick(8, 12),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_routed_experts=experts,
        n_group=groups,
        topk_group=topk_group,
        num_experts_per_tok=topk,
        n_shared_experts=pick(0, 1, 2),
        first_k_dense_replace=pick(0, 1),
        q_lora_rank=pick(None, 12),
        kv_lora_rank=pick(8, 10),
        qk_rope_head_dim=pick(4, 6),
        qk_nope_head_dim=pick(0, 6),
        v_head_dim=pick(5, 8),
        norm_topk_prob=pick(True, False),
        routed_scaling_factor=pick(1.0, 2.5),
        tie_word_embeddings=pick(False, True),
        rope_interleave=pick(True, False),
        max_position_embeddings=64,
    )
    if pick(False, True) or mscale_all_dim is not None:
        cfg["rope_parameters"] = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": pick(0.0, 1.0, 0.707) if mscale_all_dim is None else mscale_all_dim,
        }
    return cfg


def random_hf_model(seed: int, mscale_all_dim: float | None = None):
    config = transformers.DeepseekV3Config(**random_config(seed, mscale_all_dim))
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.15 if param.dim() > 1 else 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(seed))


SEEDS = range(8)


@pytest.mark.parametrize("seed", SEEDS)
def test_logits_equal_transformers_deepseek_v3(seed, tmp_path):
    reference = random_hf_model(seed)
    reference.save_pretrained(tmp_path)
    model = hf.load(tmp_path)
    assert model.cfg.mla
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mscale_all_dim", [0.0, 0.707, 1.0])
def test_yarn_logits_equal_transformers(mscale_all_dim, tmp_path):
    reference = random_hf_model(11, mscale_all_dim)  # positions 0..20 pass the original 16
    reference.save_pretrained(tmp_path)
    model = hf.load(tmp_path)
    assert model.cfg.yarn_factor == 4.0
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)


def add_mtp_layer(folder, num_layers: int) -> None:
    """Part of DeepSeek's layout for one MTP depth (layer L beside the main model's), without
    the depth's attention and MLP (tests/unit/test_hf_deepseek_mtp.py has whole depths)."""
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    hidden = config["hidden_size"]
    prefix = f"model.layers.{num_layers}"
    extra = {
        f"{prefix}.enorm.weight": torch.ones(hidden),
        f"{prefix}.hnorm.weight": torch.ones(hidden),
        f"{prefix}.eh_proj.weight": torch.randn(hidden, 2 * hidden),
        f"{prefix}.shared_head.norm.weight": torch.ones(hidden),
        f"{prefix}.input_layernorm.weight": torch.ones(hidden),
    }
    save_file(extra, str(folder / "model.safetensors").replace("model.", "mtp."))
    shards = {**load_file(folder / "model.safetensors"), **extra}
    (folder / "mtp.safetensors").unlink()
    save_file(shards, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_an_incomplete_mtp_layer_is_refused_naming_the_tensor(tmp_path):
    reference = random_hf_model(3)
    reference.save_pretrained(tmp_path)
    layers = reference.config.num_hidden_layers
    add_mtp_layer(tmp_path, layers)
    with pytest.raises(ValueError, match=rf"model\.layers\.{layers}\.self_attn\..* is missing"):
        hf.load(tmp_path)


@pytest.mark.parametrize("seed", [0, 5])
def test_convert_from_hf_then_to_hf_is_exact(seed, tmp_path):
    reference = random_hf_model(seed)
    reference.config.rope_interleave = True  # export writes DeepSeek's interleaved order
    reference.save_pretrained(tmp_path / "src")
    assert main(["convert", "--from-hf", str(tmp_path / "src"), "--out", str(tmp_path / "ck")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "dst")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", **EAGER)
    assert type(back) is type(reference)
    want, got = reference.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    src, dst = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "dst"))
    assert hf.config_from_hf(src) == hf.config_from_hf(dst)


def test_moefold_to_hf_to_moefold_is_exact(tmp_path):
    reference = random_hf_model(6)
    reference.save_pretrained(tmp_path / "src")
    model = hf.load(tmp_path / "src")
    hf.save(model, tmp_path / "dst")
    back = hf.load(tmp_path / "dst")
    assert (back.cfg, back.moe_cfg) == (model.cfg, model.moe_cfg)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"kv_lora_rank": "8"}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 1}, "qk_rope_head_dim"),
        ({"n_group": 2, "topk_group": 3}, "topk_group"),
        ({"num_experts_per_tok": 1, "norm_topk_prob": True}, "norm_topk_prob"),
        ({"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
        ({"rope_interleave": "yes"}, "rope_interleave"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters"),
    ],
)
def test_import_rejects_bad_deepseek_configs(extra, message):
    config = transformers.DeepseekV3Config(**random_config(0)).to_dict()
    config.update(extra)
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf(config)
