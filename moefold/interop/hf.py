"""Hugging Face interop: parameter mapping both ways and streaming safetensors I/O; the config
mapping and the family table live in hf_config.py (re-exported here).

Layouts (D model dim, F FFN hidden, E experts): transformers stores every projection as an
nn.Linear weight [out, in]. moefold keeps that layout for attention, dense MLPs, the shared
expert and the router, but stacks routed experts transposed: gate/up [E, D, F], down [E, F, D].
On disk each HF expert has its own tensors (Mixtral `block_sparse_moe.experts.e.w1/w3/w2`, Qwen
`mlp.experts.e.{gate,up,down}_proj`): the format transformers 4 and 5 read and transformers 5
writes. transformers 5's fused in-memory layout (`mlp.experts.gate_up_proj` [E, 2F, D],
`mlp.experts.down_proj` [E, D, F]) is read as well.

Streaming: tensors move as (moefold name, tensor) iterators, one tensor at a time: from an HF
folder (`hf_tensors`), a live model (`model_tensors`) or a DCP checkpoint of any parallel layout
(`checkpoint_tensors`, read layer by layer), into a model (`fill_model`), a DCP checkpoint
(`save_model_checkpoint`) or size-capped safetensors shards (`write_hf`). transformers itself is
never imported.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from moefold.checkpoint import CONFIG_FILE, TRAINER_FILE
from moefold.config import JobConfig, ModelConfig, MoEConfig, job_to_toml, load_job
from moefold.interop.hf_config import (  # noqa: F401 (FAMILIES, MOE_FAMILIES: re-exported)
    FAMILIES,
    MOE_FAMILIES,
    config_from_hf,
    config_to_hf,
    hf_family,
)
from moefold.model.transformer import Transformer

HF_CONFIG_SIDECAR = "hf_config.json"  # the source config.json, kept beside an imported checkpoint
DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
_IGNORED_HF_KEYS = re.compile(r"rotary_emb\.inv_freq$")

# ---- names ----------------------------------------------------------------------------------

_TOP_LEVEL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_EXPERT_MATRIX = {
    "mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
    "qwen": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_NAME = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


def _moe_block(family: str) -> str:
    return "block_sparse_moe" if family == "mixtral" else "mlp"


def _layer_renames(family: str) -> dict[str, str]:
    """moefold name inside a block -> HF name inside `model.layers.i`."""
    names = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "mlp.router.weight": f"{_moe_block(family)}.gate.weight",
        "mlp.shared_expert.gate.weight": "mlp.shared_expert_gate.weight",
    }
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for leaf in ("weight", "bias"):
            names[f"attn.{proj}.{leaf}"] = f"self_attn.{proj}.{leaf}"
    for norm in ("q_norm", "k_norm"):
        names[f"attn.{norm}.weight"] = f"self_attn.{norm}.weight"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        names[f"mlp.{proj}.weight"] = f"mlp.{proj}.weight"
        names[f"mlp.shared_expert.{proj}.weight"] = f"mlp.shared_expert.{proj}.weight"
    return names


def hf_name(name: str, family: str) -> str:
    """The HF key of a moefold tensor that maps one to one (every tensor but routed experts)."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _LAYER_NAME.match(name)
    renamed = _layer_renames(family).get(match.group(2)) if match else None
    if renamed is None:
        raise ValueError(f"{name}: no counterpart in a transformers {family} model")
    return f"model.layers.{match.group(1)}.{renamed}"


def expert_keys(name: str, family: str, num_experts: int) -> list[str]:
    """Per-expert HF keys of `layers.i.mlp.experts.{gate,up,down}_proj`, in expert order."""
    layer, matrix = _EXPERT_NAME.match(name).groups()
    hf_matrix = _EXPERT_MATRIX["mixtral" if family == "mixtral" else "qwen"][matrix]
    block = f"model.layers.{layer}.{_moe_block(family)}.experts"
    return [f"{block}.{e}.{hf_matrix}.weight" for e in range(num_experts)]


def to_hf_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], model: ModelConfig, moe: MoEConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """moefold (name, tensor) stream -> HF (key, tensor) stream of the matching family."""
    family = hf_family(model, moe)
    for name, tensor in tensors:
        if _EXPERT_NAME.match(name):
            keys = expert_keys(name, family, moe.num_experts)
            for key, expert in zip(keys, tensor.unbind(0), strict=True):
                yield key, expert.T.contiguous()
            continue
        yield hf_name(name, family), tensor
        if family == "qwen2_moe" and not moe.shared_ffn_hidden and name.endswith("router.weight"):
            # transformers always builds Qwen2-MoE's shared expert: give it zero width.
            prefix = hf_name(name, family).removesuffix("gate.weight")
            hidden = tensor.shape[1]
            for proj, shape in (
                ("gate_proj", (0, hidden)),
                ("up_proj", (0, hidden)),
                ("down_proj", (hidden, 0)),
            ):
                yield f"{prefix}shared_expert.{proj}.weight", tensor.new_zeros(shape)
            yield f"{prefix}shared_expert_gate.weight", tensor.new_zeros(1, hidden)


# ---- safetensors folders --------------------------------------------------------------------


class SafetensorsFolder:
    """One-tensor-at-a-time reads from an HF folder (model.safetensors or a sharded index);
    remembers which keys were read so unmapped tensors can be reported."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {key: self.path / file for key, file in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                self.file_of = dict.fromkeys(handle.keys(), single)
        else:
            raise ValueError(
                f"{self.path}: no model.safetensors or model.safetensors.index.json;"
                " moefold reads safetensors folders (save_pretrained's default)"
            )
        self.read_keys: set[str] = set()
        self._handles: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise ValueError(
                f"{self.path}: tensor {key} is missing; the folder does not match its config.json"
            )
        file = self.file_of[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        self.read_keys.add(key)
        return self._handles[file].get_tensor(key)

    def unread_keys(self) -> list[str]:
        return sorted(set(self.file_of) - self.read_keys)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Buffers HF tensors and writes safetensors shards of at most `max_shard_bytes` (a larger
    single tensor gets a shard of its own); close() names them and writes the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int, dtype: torch.dtype | None) -> None:
        self.out_dir, self.max_shard_bytes, self.dtype = out_dir, max_shard_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to(self.dtype or tensor.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[key] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".part-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            final = [self.out_dir / "model.safetensors"]
        else:
            final = [
                self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
            ]
        weight_map = {}
        for (tmp, keys), path in zip(self.shards, final, strict=True):
            tmp.rename(path)
            weight_map.update(dict.fromkeys(keys, path.name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return final


# ---- tensor streams -------------------------------------------------------------------------


def expected_shapes(model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Size]:
    """Name -> shape of every state-dict tensor of the moefold model (built on the meta device)."""
    with torch.device("meta"):
        skeleton = Transformer(model, moe)
    return {name: tensor.shape for name, tensor in skeleton.state_dict().items()}


def _read_experts(folder: SafetensorsFolder, name: str, family: str, num_experts: int):
    keys = expert_keys(name, family, num_experts)
    if keys[0] in folder:
        return torch.stack([folder.get(key).T for key in keys])
    layer, matrix = _EXPERT_NAME.match(name).groups()
    fused = f"model.layers.{layer}.mlp.experts"
    if matrix == "down_proj":
        return folder.get(f"{fused}.down_proj").transpose(1, 2)
    gate_up = folder.get(f"{fused}.gate_up_proj")  # [E, 2F, D], gate rows first
    half = gate_up.shape[1] // 2
    return (gate_up[:, :half] if matrix == "gate_proj" else gate_up[:, half:]).transpose(1, 2)


def _present_key(folder: SafetensorsFolder, key: str) -> str:
    # transformers 5 renames Mixtral's block_sparse_moe to mlp in its in-memory layout.
    fallback = key.replace(".block_sparse_moe.", ".mlp.")
    return fallback if key not in folder and fallback in folder else key


def _ignorable(key: str, model: ModelConfig, moe: MoEConfig) -> bool:
    if _IGNORED_HF_KEYS.search(key) or (key == "lm_head.weight" and model.tie_embeddings):
        return True
    return moe.enabled and not moe.shared_ffn_hidden and ".mlp.shared_expert" in key


def hf_tensors(folder: SafetensorsFolder, hf_config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The moefold (name, fp32 tensor) stream of an HF folder, in state-dict order.

    Raises ValueError on a shape that contradicts the config, a missing tensor, or (after the
    last tensor) an HF tensor that nothing consumed.
    """
    model, moe = config_from_hf(hf_config)
    family = hf_config["model_type"]
    for name, shape in expected_shapes(model, moe).items():
        if _EXPERT_NAME.match(name):
            tensor = _read_experts(folder, name, family, moe.num_experts)
        else:
            tensor = folder.get(_present_key(folder, hf_name(name, family)))
        if tensor.shape != shape:
            raise ValueError(
                f"{folder.path}: {name} has shape {tuple(tensor.shape)}, the config "
                f"implies {tuple(shape)}"
            )
        yield name, tensor.to(torch.float32).contiguous()
    leftover = [k for k in folder.unread_keys() if not _ignorable(k, model, moe)]
    if leftover:
        raise ValueError(f"{folder.path}: tensors with no moefold counterpart: {leftover[:5]}")


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach()


@contextmanager
def _single_process_dcp():
    # DCP warns on every single-process call; conversions are single-process by design.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _layer_groups(names: Iterable[str]) -> Iterator[list[str]]:
    group: list[str] = []
    for name in names:
        if group and name.split(".")[:2] != group[0].split(".")[:2]:
            yield group
            group = []
        group.append(name)
    if group:
        yield group


def checkpoint_tensors(path: Path, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors of a DCP checkpoint saved under any parallel layout, one layer at a time."""
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for group in _layer_groups(names):
        buffers = {}
        for name in group:
            entry = metadata.get(f"model.{name}")
            if entry is None:
                raise ValueError(
                    f"{path}: the checkpoint has no tensor model.{name}; it does not "
                    f"match its {CONFIG_FILE}"
                )
            buffers[name] = torch.empty(entry.size, dtype=entry.properties.dtype)
        with _single_process_dcp():
            dcp.load({"model": buffers}, checkpoint_id=str(path), no_dist=True)
        yield from buffers.items()


# ---- sinks ----------------------------------------------------------------------------------


@torch.no_grad()
def fill_model(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy a (name, tensor) stream into a model's state dict; every entry must be covered."""
    state = model.state_dict()
    missing = set(state)
    for name, tensor in tensors:
        if name not in state:
            raise ValueError(f"{name}: not a tensor of this model")
        state[name].copy_(tensor)
        missing.discard(name)
    if missing:
        raise ValueError(f"tensors missing from the source: {sorted(missing)[:5]}")


def prepare_output_dir(path: Path, what: str) -> None:
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"--out: {path} is not empty; choose a new folder for the {what}")
    path.mkdir(parents=True, exist_ok=True)


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]],
    model: ModelConfig,
    moe: MoEConfig,
    out_dir: str | Path,
    *,
    base_config: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a moefold (name, tensor) stream as an HF folder (safetensors shards + config.json)."""
    out_dir = Path(out_dir)
    config = config_to_hf(model, moe, base_config, dtype)  # fails before any file is written
    prepare_output_dir(out_dir, "Hugging Face model")
    writer = ShardWriter(out_dir, max_shard_bytes, dtype)
    for key, tensor in to_hf_tensors(tensors, model, moe):
        writer.add(key, tensor)
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return copied


def save_model_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    job: JobConfig,
    out: str | Path,
    *,
    hf_config: dict | None = None,
    source: str = "",
) -> Path:
    """A model-only DCP checkpoint folder (.metadata, config.toml, trainer.json at step 0) that
    `moefold.checkpoint.load_checkpoint(path, model, None)` loads under any layout.

    The stream is gathered once (the model is in memory once) and written atomically.
    """
    out = Path(out)
    prepare_output_dir(out, "checkpoint")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    expected = expected_shapes(job.model, job.moe)
    state = dict(tensors)
    if set(state) != set(expected):
        raise ValueError(
            f"the stream does not match the model: missing "
            f"{sorted(set(expected) - set(state))[:5]}, extra "
            f"{sorted(set(state) - set(expected))[:5]}"
        )
    with _single_process_dcp():
        dcp.save({"model": state}, checkpoint_id=str(tmp), no_dist=True)
    (tmp / CONFIG_FILE).write_text(job_to_toml(job))
    trainer_state = {
        "step": 0,
        "converted_from": source,
        "note": "model weights only; no optimizer or data-loader state",
    }
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
    if hf_config is not None:
        (tmp / HF_CONFIG_SIDECAR).write_text(json.dumps(hf_config, indent=2))
    out.rmdir()
    tmp.rename(out)
    return out


# ---- entry points ---------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path}: no config.json; pass a Hugging Face model folder")
    return json.loads(file.read_text())


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """A single-process moefold model (eval mode) with the weights of an HF folder.

    Its forward maps token ids [B, S] to logits [B, S, V]; `model.cfg` and `model.moe_cfg`
    hold the mapped configs.
    """
    hf = read_hf_config(path)
    model = Transformer(*config_from_hf(hf))
    with SafetensorsFolder(path) as folder:
        fill_model(model, hf_tensors(folder, hf))
    return model.to(dtype).eval()


def save(model: Transformer, out_dir: str | Path, **kwargs) -> Path:
    """Write a single-process moefold model as an HF folder (see write_hf for kwargs)."""
    return write_hf(model_tensors(model), model.cfg, model.moe_cfg, out_dir, **kwargs)


def import_checkpoint(hf_dir: str | Path, out: str | Path) -> Path:
    """HF folder -> moefold DCP checkpoint (model weights, config.toml, the source config)."""
    hf = read_hf_config(hf_dir)
    model, moe = config_from_hf(hf)
    with SafetensorsFolder(hf_dir) as folder:
        return save_model_checkpoint(
            hf_tensors(folder, hf),
            JobConfig(model=model, moe=moe),
            out,
            hf_config=hf,
            source=str(hf_dir),
        )


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """moefold DCP checkpoint (any parallel layout) -> HF folder, one layer in memory at a time."""
    checkpoint = Path(checkpoint)
    job = load_job(str(checkpoint / CONFIG_FILE))
    sidecar = checkpoint / HF_CONFIG_SIDECAR
    base = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    names = expected_shapes(job.model, job.moe)
    return write_hf(
        checkpoint_tensors(checkpoint, names),
        job.model,
        job.moe,
        out_dir,
        base_config=base,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )
