"""`moefold convert` and `moefold upcycle`: sub-parser builders and their implementations.

    moefold convert --from-hf HF_DIR --out CKPT          HF folder -> moefold DCP checkpoint
    moefold convert --to-hf CKPT --out HF_DIR            checkpoint (any layout) -> HF folder
    moefold convert --from-gguf FILE|smollm2 --out HF_DIR [--layers N]
    moefold upcycle --dense HF_DIR --experts E --topk K [--granularity G]
        [--router-order topk_then_softmax|softmax_then_topk]
        [--scaling paper|megatron|swiglu_exact|none] --out DIR [--format hf|moefold]

Heavy imports happen inside the commands, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
# The choices of moefold.model.upcycle, repeated so that building the parser imports no torch
# (a unit test keeps them equal).
ROUTER_ORDERS = ("topk_then_softmax", "softmax_then_topk")
SCALINGS = ("paper", "megatron", "swiglu_exact", "none")


def add_convert_parser(sub) -> None:
    """Register `convert` on an argparse sub-parsers object."""
    parser = sub.add_parser("convert", help="convert between Hugging Face and moefold formats")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="HF folder -> moefold checkpoint")
    source.add_argument("--to-hf", metavar="CKPT", help="moefold checkpoint (or run) -> HF folder")
    source.add_argument(
        "--from-gguf",
        metavar="FILE",
        help="llama.cpp GGUF (Llama) -> HF folder; 'smollm2' = the bundled one",
    )
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(_DTYPES),
        help="--to-hf: tensor dtype of the safetensors files",
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=2.0, help="--to-hf: largest safetensors shard in GB"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="--from-gguf: keep only the first N layers (test slices)",
    )
    parser.set_defaults(run=run_convert)


def add_upcycle_parser(sub) -> None:
    """Register `upcycle` on an argparse sub-parsers object."""
    parser = sub.add_parser("upcycle", help="turn a dense HF model into an MoE")
    parser.add_argument(
        "--dense",
        required=True,
        metavar="HF_DIR",
        help="dense Llama / Qwen2 / Qwen3 Hugging Face folder",
    )
    parser.add_argument("--experts", type=int, required=True, help="routed experts E (total)")
    parser.add_argument("--topk", type=int, required=True, help="experts per token (multiple of G)")
    parser.add_argument(
        "--granularity",
        type=int,
        default=1,
        help="G: split each dense MLP into G experts of 1/G width",
    )
    parser.add_argument("--router-order", default="topk_then_softmax", choices=ROUTER_ORDERS)
    parser.add_argument(
        "--scaling",
        default="swiglu_exact",
        choices=SCALINGS,
        help="how expert weights undo the 1/a output scale of upcycling",
    )
    parser.add_argument(
        "--router-std", type=float, default=1e-3, help="std of the random router rows"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router draw")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument(
        "--format",
        default="hf",
        choices=("hf", "moefold"),
        help="HF folder of the matching MoE family, or a moefold checkpoint",
    )
    parser.set_defaults(run=run_upcycle)


def _fail(error: Exception) -> int:
    print(f"moefold: error: {error}", file=sys.stderr)
    return 2


def run_convert(args: argparse.Namespace) -> int:
    if not 0 < args.max_shard_gb < float("inf"):  # checked before torch is imported
        return _fail(ValueError(f"--max-shard-gb: must be > 0, got {args.max_shard_gb}"))
    import torch

    from moefold.checkpoint import CheckpointError, resolve_checkpoint
    from moefold.interop import gguf, hf
    from moefold.run_dir import newest_run

    try:
        if args.from_hf:
            out = hf.import_checkpoint(args.from_hf, args.out)
        elif args.to_hf:
            out = hf.export_checkpoint(
                resolve_checkpoint(newest_run(Path(args.to_hf)), "--to-hf"),
                args.out,
                dtype=getattr(torch, _DTYPES[args.dtype]),
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
            )
        else:
            source = gguf.smollm2_gguf_path() if args.from_gguf == "smollm2" else args.from_gguf
            out = gguf.gguf_to_hf(source, args.out, args.layers)
    except (ValueError, CheckpointError, OSError) as error:  # OSError names its path
        return _fail(error)
    print(f"moefold: wrote {out}")
    return 0


def upcycle(dense_dir: str | Path, out: str | Path, spec, fmt: str = "hf") -> Path:
    """Upcycle a dense HF folder into an HF folder of the matching MoE family (Llama ->
    Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE; softmax-then-top-k from Llama -> Qwen2-MoE
    without bias) or a moefold checkpoint, streaming one dense tensor at a time.

    Args:
        spec: a moefold.model.upcycle.UpcycleSpec.
        fmt: "hf" or "moefold".
    """
    from moefold.config import JobConfig
    from moefold.interop import hf
    from moefold.interop.output_dir import check_output_dir
    from moefold.model.upcycle import upcycle_tensors, upcycled_moe_config

    dense_config = hf.read_hf_config(dense_dir)
    check_output_dir(Path(out), "checkpoint" if fmt == "moefold" else "Hugging Face model")
    with hf.SafetensorsFolder(dense_dir) as folder:
        model_cfg, dense_moe = hf.check_folder(folder, dense_config)
        if dense_moe.enabled:
            raise ValueError(
                f"--dense: {dense_dir} is already an MoE "
                f"({dense_config['model_type']}); pass a dense Llama/Qwen2/Qwen3 folder"
            )
        moe_cfg = upcycled_moe_config(model_cfg, spec)
        tensors = upcycle_tensors(hf.hf_tensors(folder, dense_config), spec)
        if fmt == "moefold":
            return hf.save_model_checkpoint(
                tensors,
                JobConfig(model=model_cfg, moe=moe_cfg),
                out,
                hf_config=dense_config,
                source=str(dense_dir),
                tokenizer_from=dense_dir,
            )
        return hf.write_hf(
            tensors, model_cfg, moe_cfg, out, base_config=dense_config, tokenizer_from=dense_dir
        )


def run_upcycle(args: argparse.Namespace) -> int:
    from moefold.model.upcycle import UpcycleSpec

    try:
        spec = UpcycleSpec(
            num_experts=args.experts,
            topk=args.topk,
            granularity=args.granularity,
            router_order=args.router_order,
            scaling=args.scaling,
            router_std=args.router_std,
            seed=args.seed,
        )
        out = upcycle(args.dense, args.out, spec, args.format)
    except (ValueError, OSError) as error:  # OSError names its path
        return _fail(error)
    print(f"moefold: wrote {out}")
    return 0
