"""Hugging Face interop: moefold logits equal transformers' for every supported family, export
and import round trips are exact, unsupported configs fail loudly, checkpoints of any parallel
layout export, and the SmolLM2 GGUF converts (first layers only)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from moefold.cli import main
from moefold.config import JobConfig, ModelConfig, MoEConfig, TrainConfig, load_job
from moefold.interop import hf
from moefold.model import build_model

transformers = pytest.importorskip("transformers")
# transformers builds Qwen2-MoE's zero-width shared expert (no shared expert) with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

# transformers' default grouped_mm experts need 16-byte-aligned strides on CPU (odd sizes fail);
# its eager per-expert loop is the reference anyway.
EAGER = {"experts_implementation": "eager"}

# Odd widths, several GQA ratios, explicit head_dim, tied and untied embeddings, dense-first
# and every-other-layer MoE patterns, top-k renormalised or not, with and without shared expert.
CASES = {
    "llama-gqa5-untied": (
        "llama",
        dict(hidden_size=30, intermediate_size=22, num_attention_heads=5, num_key_value_heads=1),
    ),
    "llama-headdim8-tied": (
        "llama",
        dict(
            hidden_size=20,
            intermediate_size=18,
            head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=500.0,
        ),
    ),
    "qwen2-mha-tied": (
        "qwen2",
        dict(
            hidden_size=28,
            intermediate_size=26,
            num_attention_heads=7,
            num_key_value_heads=7,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-gqa2": (
        "qwen3",
        dict(
            hidden_size=24,
            intermediate_size=18,
            head_dim=10,
            num_attention_heads=6,
            num_key_value_heads=3,
        ),
    ),
    "mixtral-gqa5": (
        "mixtral",
        dict(
            hidden_size=20,
            intermediate_size=14,
            num_attention_heads=5,
            num_key_value_heads=1,
            num_local_experts=5,
            num_experts_per_tok=2,
        ),
    ),
    "mixtral-topk-all-tied": (
        "mixtral",
        dict(
            hidden_size=24,
            intermediate_size=10,
            num_attention_heads=3,
            num_key_value_heads=3,
            num_local_experts=3,
            num_experts_per_tok=3,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2_moe-shared-dense-first": (
        "qwen2_moe",
        dict(
            hidden_size=22,
            intermediate_size=18,
            head_dim=12,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=7,
            num_experts_per_tok=3,
            moe_intermediate_size=10,
            shared_expert_intermediate_size=14,
            mlp_only_layers=[0],
            num_hidden_layers=3,
        ),
    ),
    "qwen2_moe-every-other-renorm-tied": (
        "qwen2_moe",
        dict(
            hidden_size=16,
            intermediate_size=12,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=6,
            shared_expert_intermediate_size=9,
            decoder_sparse_step=2,
            num_hidden_layers=4,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_moe-renorm-dense-middle": (
        "qwen3_moe",
        dict(
            hidden_size=24,
            intermediate_size=20,
            head_dim=10,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            mlp_only_layers=[1],
            num_hidden_layers=3,
            norm_topk_prob=True,
        ),
    ),
    "qwen3_moe-plain-tied": (
        "qwen3_moe",
        dict(
            hidden_size=18,
            intermediate_size=14,
            head_dim=6,
            num_attention_heads=3,
            num_key_value_heads=1,
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=8,
            tie_word_embeddings=True,
        ),
    ),
}
VOCAB = 53


def random_hf_model(case: str, seed: int = 0):
    family, kwargs = CASES[case]
    kwargs = {"vocab_size": VOCAB, "num_hidden_layers": 2, **kwargs}
    if "rope_theta" in kwargs:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")}
    config = transformers.AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, **EAGER).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1 if param.dim() > 1 else 0.05)
    return model


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- parity and round trips -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_moefold_logits_equal_transformers_logits(case, tmp_path):
    reference = random_hf_model(case)
    reference.save_pretrained(tmp_path)
    model = hf.load(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)
    assert model.cfg.tie_embeddings == bool(reference.config.tie_word_embeddings)


@pytest.mark.parametrize("case", CASES)
def test_convert_from_hf_then_to_hf_is_exact(case, tmp_path):
    reference = random_hf_model(case, seed=2)
    reference.save_pretrained(tmp_path / "src")
    assert main(["convert", "--from-hf", str(tmp_path / "src"), "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / ".metadata").is_file()
    assert main(["convert", "--to-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "dst")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", **EAGER)
    assert type(back) is type(reference)
    assert_same_state(back.state_dict(), reference.state_dict())
    src, dst = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "dst"))
    assert hf.config_from_hf(src) == hf.config_from_hf(dst)


MOEFOLD_MODELS = {
    "mixtral-like": ({}, dict(num_experts=4, topk=2, ffn_hidden=12)),
    "qwen2_moe-bias-shared-dense-first": (
        dict(attn_bias=True, tie_embeddings=True),
        dict(
            num_experts=5,
            topk=2,
            ffn_hidden=10,
            first_dense_layers=1,
            pre_softmax=True,
            shared_ffn_hidden=14,
            shared_gate=True,
        ),
    ),
    "qwen2_moe-softmax-then-topk-no-shared": (
        {},
        dict(num_experts=6, topk=3, ffn_hidden=8, pre_softmax=True, layer_freq=2),
    ),
    "qwen3_moe-qknorm": (
        dict(qk_norm=True, head_dim=10),
        dict(num_experts=4, topk=1, ffn_hidden=12),
    ),
    "llama-dense": ({}, {}),
    "qwen2-dense-tied": (dict(attn_bias=True, tie_embeddings=True), {}),
}


@pytest.mark.parametrize("case", MOEFOLD_MODELS)
def test_moefold_model_exports_to_transformers_and_back_exactly(case, tmp_path):
    model_kwargs, moe_kwargs = MOEFOLD_MODELS[case]
    model_cfg = ModelConfig(
        **{
            "hidden": 20,
            "layers": 3,
            "heads": 5,
            "kv_heads": 1,
            "ffn_hidden": 16,
            "vocab_size": VOCAB,
            "init_std": 0.1,
            **model_kwargs,
        }
    )
    job = JobConfig(model=model_cfg, moe=MoEConfig(**moe_kwargs), train=TrainConfig(seed=3))
    model = build_model(job).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms start at 1 and biases at 0: make them count
                param.add_(0.2 * torch.randn_like(param))
    hf.save(model, tmp_path)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **EAGER).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), exported(ids).logits, rtol=0, atol=1e-5)
    back = hf.load(tmp_path)
    assert_same_state(back.state_dict(), model.state_dict())
    expected = model.cfg
    if hf.hf_family(model.cfg, model.moe_cfg) == "mixtral":
        # Mixtral has one intermediate_size: the unused dense width becomes the expert width.
        expected = dataclasses.replace(expected, ffn_hidden=model.moe_cfg.ffn_hidden)
    assert (back.cfg, back.moe_cfg) == (expected, model.moe_cfg)
    assert hf.config_from_hf(hf.config_to_hf(back.cfg, back.moe_cfg)) == (back.cfg, back.moe_cfg)


def test_sharded_export_writes_an_index_that_transformers_loads(tmp_path):
    reference = random_hf_model("qwen2_moe-shared-dense-first")
    reference.save_pretrained(tmp_path / "src")
    model = hf.load(tmp_path / "src")
    hf.save(model, tmp_path / "dst", max_shard_bytes=4096)
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / "dst" / f).is_file() for f in files)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst", **EAGER)
    assert_same_state(back.state_dict(), reference.state_dict())
    assert_same_state(hf.load(tmp_path / "dst").state_dict(), model.state_dict())


def test_bfloat16_export_rounds_every_tensor_once(tmp_path):
    reference = random_hf_model("mixtral-gqa5")
    reference.save_pretrained(tmp_path / "src")
    assert main(["convert", "--from-hf", str(tmp_path / "src"), "--out", str(tmp_path / "ck")]) == 0
    argv = ["convert", "--to-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "bf16")]
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=torch.bfloat16
    )
    expected = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    assert_same_state(back.state_dict(), expected)


@pytest.mark.parametrize("case", ["mixtral-gqa5", "qwen3_moe-renorm-dense-middle"])
def test_reads_the_fused_expert_layout_of_transformers_5(case, tmp_path):
    reference = random_hf_model(case)
    state = reference.state_dict()
    assert any(key.endswith("experts.gate_up_proj") for key in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    reference.config.to_json_file(tmp_path / "config.json")
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf.load(tmp_path)(ids), reference(ids).logits, rtol=0, atol=1e-5)


# ---- loud failures ----------------------------------------------------------------------------


def test_an_unmapped_tensor_is_reported(tmp_path):
    reference = random_hf_model("llama-gqa5-untied")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    reference.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no moefold counterpart.*mlp.extra"):
        hf.load(tmp_path)


BASE = {
    "model_type": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 8,
    "vocab_size": 10,
}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model_type": "gpt2"}, "model_type: 'gpt2' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "rope_type 'llama3'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias: true biases o_proj"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        (
            {
                "model_type": "mixtral",
                "sliding_window": 4096,
                "num_local_experts": 2,
                "num_experts_per_tok": 1,
            },
            "sliding_window",
        ),
        (
            {
                "model_type": "qwen3_moe",
                "num_hidden_layers": 4,
                "mlp_only_layers": [1],
                "num_experts": 2,
                "num_experts_per_tok": 1,
                "moe_intermediate_size": 4,
            },
            r"MoE layers \[0, 2, 3\]",
        ),
    ],
)
def test_import_rejects_what_moefold_cannot_hold(extra, message):
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf({**BASE, **extra})


@pytest.mark.parametrize(
    "model_kwargs, moe_kwargs, message",
    [
        ({}, dict(score="sigmoid"), "moe.score='sigmoid'"),
        ({}, dict(expert_bias=True), "moe.expert_bias"),
        ({}, dict(num_groups=2, group_topk=1), "moe.num_groups"),
        ({}, dict(shared_ffn_hidden=8), "moe.shared_gate=false"),
        (dict(qk_norm=True, attn_bias=True), {}, "model.attn_bias with model.qk_norm"),
    ],
)
def test_export_names_what_no_transformers_family_holds(model_kwargs, moe_kwargs, message):
    model = ModelConfig(
        hidden=16, layers=2, heads=4, kv_heads=2, ffn_hidden=8, vocab_size=10, **model_kwargs
    )
    moe = MoEConfig(**{"num_experts": 4, "topk": 2, "ffn_hidden": 8, **moe_kwargs})
    with pytest.raises(ValueError, match=message):
        hf.hf_family(model, moe)


def test_convert_refuses_a_non_empty_output_folder(tmp_path, capsys):
    random_hf_model("llama-gqa5-untied").save_pretrained(tmp_path / "src")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("x")
    assert main(["convert", "--from-hf", str(tmp_path / "src"), "--out", str(tmp_path / "ck")]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_interop_never_imports_transformers():
    probe = (
        "import sys, moefold.cli, moefold.interop.hf, moefold.interop.gguf, "
        "moefold.interop.commands, moefold.model.upcycle; "
        "moefold.cli.build_parser(); print('transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---- checkpoints saved under a parallel layout --------------------------------------------------

TINY = (
    "model.hidden=32",
    "model.layers=2",
    "model.heads=4",
    "model.kv_heads=2",
    "model.ffn_hidden=64",
    "model.vocab_size=96",
    "moe.num_experts=4",
    "moe.topk=2",
    "moe.ffn_hidden=16",
    "train.seq_len=16",
    "train.global_batch=4",
    "train.micro_batch=2",
    "train.eval_batches=2",
    "data.source=synthetic",
    "model.init_std=0.1",
)


def _save_under_layout(rank, world_size, parallel: dict, ckpt_dir: str):
    from moefold.parallel.layout import ParallelLayout
    from moefold.parallel.mesh import build_parallel_groups
    from moefold.testing.reference import build_test_trainer

    job = load_job(
        "tiny-moe",
        [*TINY, f"checkpoint.dir={ckpt_dir}", *(f"parallel.{k}={v}" for k, v in parallel.items())],
    )
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    path = build_test_trainer(job, groups).save()  # collective: every rank builds and saves
    return str(path) if rank == 0 else None


@pytest.mark.dist
@pytest.mark.parametrize(
    "parallel",
    [{"tp": 2, "ep": 4}, {"pp": 2, "tp": 2, "ep": 2, "etp": 1}],
    ids=["tp2-dp2__ep4", "pp2-tp2__pp2-ep2"],
)
def test_checkpoint_of_a_parallel_layout_exports_to_hf(parallel, tmp_path):
    from moefold.testing.dist import run_ranks

    path = run_ranks(_save_under_layout, 4, parallel, str(tmp_path / "ck"), timeout=120)[0]
    assert main(["convert", "--to-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
    model = build_model(load_job(f"{path}/config.toml")).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **EAGER).eval()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids), rtol=0, atol=1e-5)
    assert_same_state(hf.load(tmp_path / "hf").state_dict(), model.state_dict())


# ---- SmolLM2 GGUF -------------------------------------------------------------------------------


def test_smollm2_gguf_first_layers_match_transformers(tmp_path):
    """2 of 30 layers and 64 tokens: the q/k un-permutation equals transformers' own GGUF
    processor, and transformers runs the converted folder with moefold's logits."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from moefold.interop import gguf

    try:
        path = gguf.smollm2_gguf_path()
    except ValueError as error:
        pytest.skip(str(error))
    reader = GGUFReader(str(path))
    gguf.gguf_to_hf(path, tmp_path, num_layers=2, reader=reader)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (2, 9)
    assert config["tie_word_embeddings"] and config["rms_norm_eps"] == 1e-5
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for tensor in reader.tensors[:12]:
        if tensor.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            raw = dequantize(tensor.data, tensor.tensor_type)
            heads = 9 if "attn_q" in tensor.name else 3
            expected = processor.process(raw, tensor.name).weights
            assert (gguf.unpermute_qk(raw, heads) == expected).all()
    model = hf.load(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)
