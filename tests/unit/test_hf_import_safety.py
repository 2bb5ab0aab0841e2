"""Importing Hugging Face folders safely (issue 28): weight files must resolve inside the
folder, config.json fields are typed and bounded and checked against the safetensors headers
before any model is built, every malformed input is a named one-line error, and a failed
convert or upcycle leaves no half-written or empty --out. Also the other malformed inputs the
CLI reads: object-dtype or garbled .npy token files and TOML syntax errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moefold.cli import main
from moefold.config import ConfigError, DataConfig, ModelConfig, MoEConfig, load_job
from moefold.data.corpus import read_token_files
from moefold.interop import hf
from moefold.interop.hf_config_check import MAX_LAYERS
from moefold.interop.output_dir import atomic_output_dir
from moefold.model.transformer import Transformer

DENSE = dict(hidden=16, layers=2, heads=4, kv_heads=2, ffn_hidden=8, vocab_size=11)
MOE = dict(num_experts=4, topk=2, ffn_hidden=6)


def hf_folder(path: Path, moe: dict | None = None, **save_kwargs) -> Path:
    """A tiny HF folder written by moefold itself (llama, or mixtral with `moe`)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**DENSE), MoEConfig(**(moe or {})))
    hf.save(model, path, **save_kwargs)
    return path


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


_DELETE = object()


def convert(src: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["convert", "--from-hf", str(src), "--out", str(out)])
    return code, capsys.readouterr().err


def assert_named_failure(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("moefold: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail loudly if a model (even a meta-device skeleton) is built while the test runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before config.json was checked")

    monkeypatch.setattr(hf, "Transformer", refuse)


@pytest.fixture
def no_real_model_built(monkeypatch):
    """Fail loudly if a model with real weights is built (meta skeletons are allowed)."""
    real = hf.Transformer

    def meta_only(*args, **kwargs):
        if torch.get_default_device().type != "meta":
            raise AssertionError("a model was built before the headers were checked")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "Transformer", meta_only)


# ---- weight files stay inside the folder ------------------------------------------------------


def _sharded_with_outside_copy(tmp_path: Path) -> tuple[Path, Path, str]:
    """A sharded folder two levels down, and a valid copy of its first shard outside it."""
    src = hf_folder(tmp_path / "a" / "b" / "hf", max_shard_bytes=600)
    index = src / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    first = sorted(set(weight_map.values()))[0]
    outside = tmp_path / "x.safetensors"
    outside.write_bytes((src / first).read_bytes())
    return src, outside, first


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_entries_outside_the_folder_are_refused(kind, tmp_path, capsys):
    src, outside, first = _sharded_with_outside_copy(tmp_path)
    (src / first).unlink()
    name = "../../../x.safetensors" if kind == "dotdot" else str(outside)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (name if v == first else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="points outside"):
        hf.load(src)
    code, err = convert(src, tmp_path / "ck", capsys)
    assert_named_failure(code, err, "model.safetensors.index.json", "points outside")
    assert not (tmp_path / "ck").exists()


def test_a_symlink_leading_out_of_the_folder_is_refused(tmp_path, capsys):
    src, outside, first = _sharded_with_outside_copy(tmp_path)
    (src / first).unlink()
    (src / first).symlink_to(outside)
    with pytest.raises(ValueError, match="symlink leading out of the folder"):
        hf.load(src)
    single = hf_folder(tmp_path / "single")
    (single / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (single / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    code, err = convert(single, tmp_path / "ck", capsys)
    assert_named_failure(code, err, "outside", "symlink")


def test_huggingface_cache_snapshots_still_load(tmp_path):
    """huggingface_hub's cache links snapshots/<rev>/file to ../../blobs/<hash>: allowed."""
    repo = tmp_path / "models--org--tiny"
    built = hf_folder(tmp_path / "built")
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in built.iterdir():
        (blobs / f"hash-{file.name}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"hash-{file.name}")
    torch.testing.assert_close(
        hf.load(snapshot).state_dict(), hf.load(built).state_dict(), rtol=0, atol=0
    )


# ---- config.json: types and bounds before anything is built -----------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 1e9}, "num_hidden_layers: expected an integer, got 1000000000.0"),
        (
            {"num_hidden_layers": 10**9},
            f"num_hidden_layers: 1000000000 is outside the sane range \\[1, {MAX_LAYERS}\\]",
        ),
        ({"hidden_size": 1 << 30}, "hidden_size: 1073741824 is outside the sane range"),
        ({"vocab_size": -3}, "vocab_size: -3 is outside the sane range"),
        ({"hidden_size": "16"}, "hidden_size: expected an integer, got '16'"),
        ({"num_attention_heads": True}, "num_attention_heads: expected an integer, got True"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps: expected a number, got 'tiny'"),
        ({"rope_theta": float("inf")}, "rope_theta: must be a finite number > 0"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings: expected true or false"),
        ({"vocab_size": _DELETE}, "vocab_size: required but missing"),
        ({"rope_parameters": "default"}, "rope_parameters: expected an object or null"),
        ({"model_type": ["llama"]}, "model_type: \\['llama'\\] is not supported"),
    ],
)
def test_bad_config_fields_are_named_before_anything_is_built(
    changes, message, tmp_path, no_model_built
):
    src = hf_folder(tmp_path / "hf")
    edit_json(src / "config.json", **changes)
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        hf.load(src)
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        hf.import_checkpoint(src, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_moe_fields_are_required_and_bounded(tmp_path, no_model_built):
    src = hf_folder(tmp_path / "hf", moe=MOE)
    config = src / "config.json"
    assert json.loads(config.read_text())["model_type"] == "mixtral"
    edit_json(config, num_local_experts=_DELETE)
    with pytest.raises(ValueError, match="num_local_experts: required for model_type 'mixtral'"):
        hf.load(src)
    edit_json(config, num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="num_experts_per_tok: 5 is more than the 4 experts"):
        hf.load(src)


def test_layer_count_is_checked_against_the_tensors(tmp_path, no_model_built):
    src = hf_folder(tmp_path / "hf")
    edit_json(src / "config.json", num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_hidden_layers=3, the safetensors files hold layers"):
        hf.load(src)


@pytest.mark.parametrize(
    "moe, changes, key",
    [
        (None, {"intermediate_size": 64}, "model.layers.0.mlp.gate_proj.weight"),
        (None, {"vocab_size": 12}, "model.embed_tokens.weight"),
        (MOE, {"intermediate_size": 7}, "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
    ],
    ids=["dense-ffn", "vocab", "expert-ffn"],
)
def test_shapes_are_checked_against_the_headers(moe, changes, key, tmp_path, no_real_model_built):
    src = hf_folder(tmp_path / "hf", moe=moe)
    edit_json(src / "config.json", **changes)
    with pytest.raises(ValueError, match=f"{key} has shape .* config.json implies"):
        hf.load(src)


# ---- malformed files ---------------------------------------------------------------------------


def test_garbage_safetensors_is_named(tmp_path, capsys):
    src = hf_folder(tmp_path / "hf")
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    code, err = convert(src, tmp_path / "ck", capsys)
    assert_named_failure(code, err, "model.safetensors: not a readable safetensors file")
    assert not (tmp_path / "ck").exists()


def test_truncated_safetensors_is_named(tmp_path, capsys):
    src = hf_folder(tmp_path / "hf")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    code, err = convert(src, tmp_path / "ck", capsys)
    assert_named_failure(code, err, "model.safetensors: not a readable safetensors file")


def test_index_naming_a_missing_shard_or_key_is_named(tmp_path):
    src = hf_folder(tmp_path / "hf", max_shard_bytes=600)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"]["model.extra.weight"] = data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="holds no tensor model.extra.weight"):
        hf.SafetensorsFolder(src)
    data["weight_map"][key] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'model-00009-of-00009.safetensors' is missing"):
        hf.SafetensorsFolder(src)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_json_that_does_not_parse_is_named(file, tmp_path, capsys):
    src = hf_folder(tmp_path / "hf", max_shard_bytes=600)
    (src / file).write_text('{"model_type": "llama",')
    code, err = convert(src, tmp_path / "ck", capsys)
    assert_named_failure(code, err, f"{src / file}: not valid JSON")


def test_object_dtype_npy_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=f"data.path: {path} is not a readable .npy"):
        read_token_files(DataConfig(source="tokens", path=str(path)), 100)


def test_garbled_npy_is_named(tmp_path):
    path = tmp_path / "tokens.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(ConfigError, match=f"data.path: {path} is not a readable .npy"):
        read_token_files(DataConfig(source="tokens", path=str(path)), 100)


def test_toml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text("[model]\nhidden = 16\nlayers = \n")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML .*line 3"):
        load_job(str(path))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err and "Traceback" not in err


# ---- all or nothing output ---------------------------------------------------------------------


def test_a_failed_from_hf_leaves_no_output_folder(tmp_path, capsys):
    src = hf_folder(tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)  # found only after the last read
    save_file(tensors, src / "model.safetensors")
    code, err = convert(src, tmp_path / "deep" / "ck", capsys)
    assert_named_failure(code, err, "no moefold counterpart")
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no --out, no parent, no temp folder


def _failing_stream(model: Transformer):
    for index, item in enumerate(hf.model_tensors(model)):
        if index == 3:
            raise ValueError("the source broke mid-stream")
        yield item


def test_a_failed_to_hf_write_leaves_no_half_written_folder(tmp_path):
    model = Transformer(ModelConfig(**DENSE), MoEConfig())
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match="mid-stream"):
        hf.write_hf(_failing_stream(model), model.cfg, model.moe_cfg, out, max_shard_bytes=300)
    assert os.listdir(tmp_path) == []


def test_an_existing_empty_out_is_kept_on_failure_and_filled_on_success(tmp_path):
    model = Transformer(ModelConfig(**DENSE), MoEConfig())
    out = tmp_path / "hf"
    out.mkdir()
    with pytest.raises(ValueError, match="mid-stream"):
        hf.write_hf(_failing_stream(model), model.cfg, model.moe_cfg, out, max_shard_bytes=300)
    assert os.listdir(tmp_path) == ["hf"] and os.listdir(out) == []
    hf.save(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(hf.load(out).state_dict(), model.state_dict(), rtol=0, atol=0)


def test_a_failed_upcycle_leaves_no_output_folder(tmp_path, capsys):
    src = hf_folder(tmp_path / "hf")
    (src / "tokenizer.json").write_text("{}")
    edit_json(src / "config.json", intermediate_size=10)
    for fmt in ("hf", "moefold"):
        argv = ["upcycle", "--dense", str(src), "--experts", "4", "--topk", "2"]
        code = main([*argv, "--out", str(tmp_path / f"up-{fmt}"), "--format", fmt])
        assert_named_failure(code, capsys.readouterr().err, "implies")
    assert os.listdir(tmp_path) == ["hf"]


def test_os_errors_while_writing_are_named_and_cleaned_up(tmp_path):
    out = tmp_path / "new" / "hf"
    with pytest.raises(ValueError, match="--out: cannot write .*shard: No space left on device"):
        with atomic_output_dir(out, "Hugging Face model") as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "shard"))
    assert os.listdir(tmp_path) == []


def test_garbage_gguf_is_named(tmp_path, capsys):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    code = main(["convert", "--from-gguf", str(path), "--out", str(tmp_path / "hf")])
    assert_named_failure(code, capsys.readouterr().err, f"{path} is not a readable GGUF file")
    assert os.listdir(tmp_path) == ["model.gguf"]
