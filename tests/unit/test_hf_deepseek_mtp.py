"""DeepSeek-V3 MTP weights in HF folders (interop/hf_deepseek.py): each depth is the extra
layer `model.layers.{L + d}` (its block, enorm, hnorm, eh_proj, shared_head.norm), which
transformers ignores; moefold imports and exports them, and round trips are exact."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moefold.interop import hf
from moefold.model.mtp import mtp_shard
from moefold.model.transformer import Transformer
from tests.unit.test_hf_deepseek import EAGER, random_hf_model, token_ids

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def with_mtp(model: Transformer, depths: int, seed: int) -> Transformer:
    """`model` plus `depths` MTP depths with random weights (norms away from 1)."""
    out = Transformer(dataclasses.replace(model.cfg, mtp_depths=depths), model.moe_cfg).eval()
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("mtp.") for name in missing)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in missing:
            tensor = out.get_parameter(name) if "expert_bias" not in name else out.get_buffer(name)
            noise = torch.randn(tensor.shape, generator=gen)
            tensor.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return out


@pytest.mark.parametrize("seed", [0, 3])
def test_mtp_depths_export_import_exactly_and_transformers_ignores_them(seed, tmp_path):
    reference = random_hf_model(seed)
    reference.config.rope_interleave = True  # export writes DeepSeek's interleaved order
    reference.save_pretrained(tmp_path / "src")
    model = with_mtp(hf.load(tmp_path / "src"), 2, seed)
    layers = model.cfg.layers
    hf.save(model, tmp_path / "dst")

    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2
    keys = set(load_file(tmp_path / "dst" / "model.safetensors"))
    for d in range(2):
        prefix = f"model.layers.{layers + d}"
        for leaf in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "input_layernorm"):
            assert f"{prefix}.{leaf}.weight" in keys
        assert f"{prefix}.self_attn.kv_b_proj.weight" in keys
        assert f"{prefix}.mlp.gate.e_score_correction_bias" in keys  # depth blocks are MoE

    # transformers loads the folder, skips the MTP layers; the main logits still agree
    ids = token_ids()
    back_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", **EAGER)
    back_hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(back_hf(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)

    # moefold -> HF -> moefold is bit-exact, MTP included
    back = hf.load(tmp_path / "dst")
    assert back.cfg == model.cfg and back.cfg.mtp_depths == 2
    for (name, a), (_, b) in zip(
        model.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    batch = torch.cat([ids, ids[:, :1]], dim=1)
    mtp_ids, _ = mtp_shard(batch, torch.arange(ids.shape[1]), 2)
    with torch.no_grad():
        torch.testing.assert_close(back(mtp_ids), model(mtp_ids), rtol=0, atol=0)

    # HF -> moefold -> HF is bit-exact too
    hf.save(back, tmp_path / "again")
    first = load_file(tmp_path / "dst" / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_deepseek_copies_of_the_shared_tables_are_skipped(tmp_path):
    """DeepSeek's release also stores embed_tokens and shared_head.head in each MTP layer."""
    reference = random_hf_model(2)
    reference.save_pretrained(tmp_path)
    model = with_mtp(hf.load(tmp_path), 1, 2)
    hf.save(model, tmp_path / "mtp")
    path = tmp_path / "mtp" / "model.safetensors"
    tensors = load_file(path)
    prefix = f"model.layers.{model.cfg.layers}"
    tensors[f"{prefix}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    tensors[f"{prefix}.shared_head.head.weight"] = head.clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    back = hf.load(tmp_path / "mtp")
    assert back.cfg.mtp_depths == 1
    for (name, a), (_, b) in zip(
        model.state_dict().items(), back.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_transformers_folder_declaring_mtp_holds_none(tmp_path):
    reference = random_hf_model(4)
    assert reference.config.num_nextn_predict_layers >= 1  # transformers' default, no weights
    reference.save_pretrained(tmp_path)
    assert hf.load(tmp_path).cfg.mtp_depths == 0


def test_mtp_outside_deepseek_is_refused_naming_the_field():
    from moefold.config import load_job

    job = load_job("tiny-moe", ["model.mtp_depths=1"])
    with pytest.raises(ValueError, match="model.mtp_depths"):
        hf.hf_family(job.model, job.moe)
