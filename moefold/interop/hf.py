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

import dataclasses
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from moefold.checkpoint import (
    CONFIG_FILE,
    TRAINER_FILE,
    load_arguments,
    read_metadata,
    verify_checkpoint,
    write_manifest,
)
from moefold.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    MoEConfig,
    job_to_toml,
    load_job,
)
from moefold.interop import hf_deepseek
from moefold.interop.hf_config import (  # noqa: F401 (FAMILIES, MOE_FAMILIES: re-exported)
    FAMILIES,
    MOE_FAMILIES,
    config_from_hf,
    config_to_hf,
    hf_family,
)
from moefold.interop.output_dir import atomic_output_dir, check_output_dir
from moefold.interop.safetensors_folder import SafetensorsFolder, read_json_object
from moefold.interop.stream_save import save_streamed
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
    if family == hf_deepseek.FAMILY:
        names.update(hf_deepseek.LAYER_RENAMES)
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
        view, own_key = hf_deepseek.layer_view(name, model)  # MTP depths: model/mtp.py
        if _EXPERT_NAME.match(view):
            keys = expert_keys(view, family, moe.num_experts)
            for key, expert in zip(keys, tensor.unbind(0), strict=True):
                yield key, expert.T.contiguous()
            continue
        if family == hf_deepseek.FAMILY:
            tensor = hf_deepseek.to_hf_rows(name, tensor, model)
        yield own_key or hf_name(view, family), tensor
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


def meta_state_dict(model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Tensor]:
    """The moefold model's state dict on the meta device: every name, shape and dtype."""
    with torch.device("meta"):
        return Transformer(model, moe).state_dict()


def expected_shapes(model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Size]:
    """Name -> shape of every state-dict tensor of the moefold model."""
    return {name: tensor.shape for name, tensor in meta_state_dict(model, moe).items()}


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
    layer = _HF_LAYER_KEY.match(key)
    if model.mla and layer and int(layer.group(1)) >= model.layers:
        # DeepSeek's MTP layers (interop/hf_deepseek.py): read when the folder holds them all
        return model.mtp_depths == 0 or key.endswith(hf_deepseek.MTP_SHARED_COPIES)
    return moe.enabled and not moe.shared_ffn_hidden and ".mlp.shared_expert" in key


_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _check_layer_count(folder: SafetensorsFolder, num_layers: int, extra: int = 0) -> None:
    """Layers 0..num_layers-1, plus `extra` MTP layers where a DeepSeek folder holds them."""
    found = sorted({int(m.group(1)) for k in folder.keys() if (m := _HF_LAYER_KEY.match(k))})
    if found not in (list(range(num_layers)), list(range(num_layers + extra))):
        held = f"layers 0..{found[-1]} ({len(found)} distinct)" if found else "no layers"
        raise ValueError(
            f"{folder.path}: config.json says num_hidden_layers={num_layers}, the safetensors "
            f"files hold {held}; the config and the weights do not belong together"
        )


def _expert_header_shapes(name: str, shape: torch.Size, family: str, num_experts: int):
    """(HF key, expected header shape) of a stacked moefold expert tensor [E, D, F] / [E, F, D]:
    per-expert keys [F, D] / [D, F], else transformers 5's fused [E, 2F, D] / [E, D, F]."""
    keys = expert_keys(name, family, num_experts)
    per_expert = [(key, (shape[2], shape[1])) for key in keys]
    layer, matrix = _EXPERT_NAME.match(name).groups()
    fused = f"model.layers.{layer}.mlp.experts"
    if matrix == "down_proj":
        return per_expert, [(f"{fused}.down_proj", (shape[0], shape[2], shape[1]))]
    return per_expert, [(f"{fused}.gate_up_proj", (shape[0], 2 * shape[2], shape[1]))]


def check_folder(folder: SafetensorsFolder, hf_config: dict) -> tuple[ModelConfig, MoEConfig]:
    """The configs of an HF folder, after checking config.json's fields (types and bounds) and
    then its layer count and every tensor shape against the safetensors headers; nothing is
    built and no tensor data is read. ValueError names the first mismatch."""
    model, moe = config_from_hf(hf_config)
    declared_mtp = hf_config.get("num_nextn_predict_layers") or 0
    _check_layer_count(folder, model.layers, declared_mtp)
    family = hf_config["model_type"]
    if family == hf_deepseek.FAMILY:  # the MTP depths the folder holds
        held = {int(m.group(1)) for k in folder.keys() if (m := _HF_LAYER_KEY.match(k))}
        depths = hf_deepseek.mtp_depths_held(held, model.layers, declared_mtp)
        model = dataclasses.replace(model, mtp_depths=depths)
    for name, shape in expected_shapes(model, moe).items():
        view, own_key = hf_deepseek.layer_view(name, model)
        if _EXPERT_NAME.match(view):
            per_expert, fused = _expert_header_shapes(view, shape, family, moe.num_experts)
            wanted = per_expert if per_expert[0][0] in folder else fused
        else:
            wanted = [(_present_key(folder, own_key or hf_name(view, family)), tuple(shape))]
        for key, expected in wanted:
            if key not in folder:
                raise ValueError(
                    f"{folder.path}: tensor {key} is missing; the folder does not match its "
                    "config.json"
                )
            if folder.shape(key) != tuple(expected):
                raise ValueError(
                    f"{folder.path}: {key} has shape {folder.shape(key)} in "
                    f"{folder.file_of[key].name}, config.json implies {tuple(expected)}"
                )
    return model, moe


def hf_tensors(folder: SafetensorsFolder, hf_config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The moefold (name, fp32 tensor) stream of an HF folder, in state-dict order.

    Checks the whole folder's headers first (check_folder); raises ValueError on a shape that
    contradicts the config, a missing tensor, or (after the last tensor) an HF tensor that
    nothing consumed.
    """
    model, moe = check_folder(folder, hf_config)
    family = hf_config["model_type"]
    for name, shape in expected_shapes(model, moe).items():
        view, own_key = hf_deepseek.layer_view(name, model)
        if _EXPERT_NAME.match(view):
            tensor = _read_experts(folder, view, family, moe.num_experts)
        else:
            tensor = folder.get(_present_key(folder, own_key or hf_name(view, family)))
        if family == hf_deepseek.FAMILY and hf_config.get("rope_interleave", True):
            tensor = hf_deepseek.from_hf_rows(name, tensor, model)
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
    verify_checkpoint(path)  # checksums, then metadata read without running code
    metadata = read_metadata(path).state_dict_metadata
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
            dcp.load({"model": buffers}, no_dist=True, **load_arguments(path))
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


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]],
    model: ModelConfig,
    moe: MoEConfig,
    out_dir: str | Path,
    *,
    base_config: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a moefold (name, tensor) stream as an HF folder (safetensors shards + config.json,
    plus the tokenizer files of `tokenizer_from`); all or nothing (output_dir.py)."""
    out_dir = Path(out_dir)
    config = config_to_hf(model, moe, base_config, dtype)  # fails before any file is written
    with atomic_output_dir(out_dir, "Hugging Face model") as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, dtype)
        for key, tensor in to_hf_tensors(tensors, model, moe):
            writer.add(key, tensor)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
    return out_dir


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    if copied:
        Path(dst).mkdir(parents=True, exist_ok=True)
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
    tokenizer_from: str | Path | None = None,
) -> Path:
    """A model-only DCP checkpoint folder (.metadata, config.toml, trainer.json at step 0) that
    `moefold.checkpoint.load_checkpoint(path, model, None)` loads under any layout.

    With `tokenizer_from` (the HF folder) the model's tokenizer files go to CKPT/tokenizer/ and
    the saved config gets data.tokenizer pointing there, plus fine-tuning defaults
    (`finetune_job`): training, generate and export then use the model's own tokenizer.

    The stream is written as it comes (stream_save.py: about one tensor in memory at a time,
    never the model), all or nothing (output_dir.py).
    """
    out = Path(out)
    check_output_dir(out, "checkpoint")
    trainer_state = {
        "step": 0,
        "converted_from": source,
        "note": "model weights only; no optimizer or data-loader state",
    }
    with atomic_output_dir(out, "checkpoint") as tmp:
        with _single_process_dcp():
            save_streamed(tensors, meta_state_dict(job.model, job.moe), tmp)
        if tokenizer_from is not None and copy_tokenizer_files(tokenizer_from, tmp / "tokenizer"):
            job = finetune_job(job, out.resolve() / "tokenizer")
        (tmp / CONFIG_FILE).write_text(job_to_toml(job))
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
        if hf_config is not None:
            (tmp / HF_CONFIG_SIDECAR).write_text(json.dumps(hf_config, indent=2))
        write_manifest(tmp)  # checksums, verified by every load
    return out


# ---- entry points ---------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{path}: no config.json; pass a Hugging Face model folder")
    return read_json_object(file)


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """A single-process moefold model (eval mode) with the weights of an HF folder.

    Its forward maps token ids [B, S] to logits [B, S, V]; `model.cfg` and `model.moe_cfg`
    hold the mapped configs.
    """
    hf = read_hf_config(path)
    with SafetensorsFolder(path) as folder:
        model = Transformer(*check_folder(folder, hf))  # built only once the headers agree
        fill_model(model, hf_tensors(folder, hf))
    return model.to(dtype).eval()


def save(model: Transformer, out_dir: str | Path, **kwargs) -> Path:
    """Write a single-process moefold model as an HF folder (see write_hf for kwargs)."""
    return write_hf(model_tensors(model), model.cfg, model.moe_cfg, out_dir, **kwargs)


def import_checkpoint(hf_dir: str | Path, out: str | Path) -> Path:
    """HF folder -> moefold DCP checkpoint (model weights, config.toml, the source config)."""
    hf = read_hf_config(hf_dir)
    check_output_dir(Path(out), "checkpoint")
    with SafetensorsFolder(hf_dir) as folder:
        model, moe = check_folder(folder, hf)
        return save_model_checkpoint(
            hf_tensors(folder, hf),
            JobConfig(model=model, moe=moe),
            out,
            hf_config=hf,
            source=str(hf_dir),
            tokenizer_from=hf_dir,
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
    base = read_json_object(sidecar) if sidecar.is_file() else None
    names = expected_shapes(job.model, job.moe)
    with tempfile.TemporaryDirectory() as scratch:
        return write_hf(
            checkpoint_tensors(checkpoint, names),
            job.model,
            job.moe,
            out_dir,
            base_config=base,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            tokenizer_from=export_tokenizer_folder(checkpoint, job, Path(scratch)),
        )


def export_tokenizer_folder(checkpoint: Path, job: JobConfig, scratch: Path) -> Path | None:
    """Where the exported model's tokenizer files come from: the checkpoint's own (converted
    from HF), data.tokenizer, or the BPE the run's text source trained (written to `scratch`
    as tokenizer.json + tokenizer_config.json for AutoTokenizer); None for synthetic ids."""
    from moefold.data import load_tokenizer, write_pretrained_files

    if (checkpoint / "tokenizer" / "tokenizer.json").is_file():
        return checkpoint / "tokenizer"
    if job.data.tokenizer:
        folder = Path(job.data.tokenizer)
        return folder.parent if folder.is_file() else folder
    if (checkpoint / HF_CONFIG_SIDECAR).is_file():
        return None  # converted without tokenizer files: the corpus BPE is not its tokenizer
    try:
        tokenizer = load_tokenizer(job.data, job.model.vocab_size)
    except ConfigError as error:  # e.g. the corpus moved: the weights still export
        warnings.warn(f"no tokenizer exported: {error}", stacklevel=2)
        return None
    if tokenizer is None:
        return None
    write_pretrained_files(tokenizer, scratch)
    return scratch


def finetune_job(job: JobConfig, tokenizer: Path) -> JobConfig:
    """A converted or upcycled model's config: its tokenizer, and fine-tuning defaults that
    train under any small --nproc (lr 1e-4, as in scripts/upcycle_demo.py; micro-batch 1 so
    global_batch=8 splits over dp = 1, 2, 4 or 8)."""
    train = dataclasses.replace(
        job.train, lr=1e-4, warmup_steps=10, global_batch=8, micro_batch=1, steps=100
    )
    data = dataclasses.replace(job.data, tokenizer=str(tokenizer))
    return dataclasses.replace(job, train=train, data=data)
