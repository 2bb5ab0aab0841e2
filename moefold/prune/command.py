"""`moefold prune`: a moefold checkpoint -> a pruned moefold checkpoint (CAMERA-P).

    moefold prune --checkpoint C --ratio 0.4 [--method camera|magnitude|random]
        [--data SOURCE] [--calib-tokens 16384] [--rho 0.9] [--seed 0] --out DIR

Calibration tokens are the first windows of the training split of the checkpoint's own data
config (or of --data: a data.source name, a .npy/.bin token file or a text file/folder), at
the checkpoint's train.seq_len. The output folder is an ordinary model-only checkpoint (its
config.toml has the stored widths) plus prune.json: the spec, the calibration size and every
expert's live width.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

PRUNE_REPORT = "prune.json"
DATA_SOURCES = ("sotu", "shakespeare", "sotu+shakespeare", "synthetic")
# moefold.prune.scoring.METHODS, repeated so that building the parser imports no torch (a unit
# test keeps them equal).
METHODS = ("camera", "magnitude", "random")


def add_prune_parser(sub) -> None:
    """Register `prune` on an argparse sub-parsers object."""
    parser = sub.add_parser("prune", help="remove micro-experts without training (CAMERA-P)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    parser.add_argument(
        "--ratio", type=float, required=True, help="fraction of micro-experts per MoE layer"
    )
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--method", default="camera", choices=METHODS)
    parser.add_argument(
        "--data",
        default=None,
        help="calibration data: a data.source name, a token file (.npy/.bin) or text "
        "file/folder (default: the checkpoint's data config)",
    )
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens")
    parser.add_argument("--rho", type=float, default=0.9, help="weight of the max term")
    parser.add_argument("--seed", type=int, default=0, help="--method random: ranking seed")
    parser.set_defaults(run=run_prune)


def calibration_data(data_cfg, source: str | None):
    """The checkpoint's DataConfig, or the one --data names."""
    if source is None:
        return data_cfg
    if source in DATA_SOURCES:
        return dataclasses.replace(data_cfg, source=source, path="")
    kind = "tokens" if source.endswith((".npy", ".bin")) else "text"
    return dataclasses.replace(data_cfg, source=kind, path=source)


def calibration_tokens(job, source: str | None, num_tokens: int):
    """The first ceil(num_tokens / seq_len) training windows [N, seq_len] (token ids)."""
    from moefold.data.loader import build_datasets

    if num_tokens < 1:
        raise ValueError(f"--calib-tokens: must be >= 1, got {num_tokens}")
    seq_len = job.train.seq_len
    train, _, _ = build_datasets(
        calibration_data(job.data, source), job.model.vocab_size, seq_len, job.train.seed
    )
    count = -(-num_tokens // seq_len)
    if count > len(train):
        raise ValueError(
            f"--calib-tokens: the calibration split has {len(train) * seq_len} tokens, fewer "
            f"than {num_tokens}; lower --calib-tokens"
        )
    return train.gather(range(count))[:, :-1]


def prune_checkpoint(checkpoint: Path, out: Path, spec, data: str | None, calib_tokens: int):
    """Load, prune, pack and save; returns the report written to out/prune.json."""
    import torch

    from moefold.checkpoint import CONFIG_FILE, load_checkpoint
    from moefold.config import load_job
    from moefold.interop.hf import HF_CONFIG_SIDECAR, model_tensors, save_model_checkpoint
    from moefold.model.transformer import Transformer
    from moefold.prune.apply import prune_in_place
    from moefold.prune.pack import live_widths, pack

    job = load_job(str(checkpoint / CONFIG_FILE))
    if not job.moe.enabled:
        raise ValueError(f"--checkpoint: {checkpoint} holds a dense model; nothing to prune")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: {out} is not empty; choose a new folder for the checkpoint")
    model = Transformer(job.model, job.moe)
    load_checkpoint(checkpoint, model, None)
    tokens = calibration_tokens(job, data, calib_tokens) if spec.method == "camera" else None
    with torch.no_grad():
        prune_in_place(model, spec, tokens)
        packed = pack(model)
    pruned_job = dataclasses.replace(job, moe=packed.moe_cfg)
    sidecar = checkpoint / HF_CONFIG_SIDECAR
    hf_config = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    save_model_checkpoint(
        model_tensors(packed), pruned_job, out, hf_config=hf_config, source=str(checkpoint)
    )
    report = {
        "source": str(checkpoint),
        **dataclasses.asdict(spec),
        "calibration_tokens": 0 if tokens is None else tokens.numel(),
        "stored_ffn_hidden": packed.moe_cfg.ffn_hidden,
        "stored_shared_ffn_hidden": packed.moe_cfg.shared_ffn_hidden,
        "live_widths": live_widths(packed),
        "expert_params": _expert_params(job.moe, packed.moe_cfg, live_widths(packed), job),
    }
    (out / PRUNE_REPORT).write_text(json.dumps(report, indent=1))
    return report


def _expert_params(before, after, widths: dict, job) -> dict[str, int]:
    """Routed + shared expert weights: before pruning, as stored, and live (3 matrices of
    hidden x width per unit)."""
    per_unit, layers = 3 * job.model.hidden, len(widths)
    units = {
        "before": layers * (before.num_experts * before.ffn_hidden + before.shared_ffn_hidden),
        "stored": layers * (after.num_experts * after.ffn_hidden + after.shared_ffn_hidden),
        "live": sum(sum(w["routed"]) + (w["shared"] or 0) for w in widths.values()),
    }
    return {name: count * per_unit for name, count in units.items()}


def run_prune(args: argparse.Namespace) -> int:
    from moefold.checkpoint import CheckpointError, resolve_checkpoint
    from moefold.prune.apply import PruneSpec

    try:
        spec = PruneSpec(ratio=args.ratio, method=args.method, rho=args.rho, seed=args.seed)
        checkpoint = resolve_checkpoint(Path(args.checkpoint), "--checkpoint")
        report = prune_checkpoint(checkpoint, Path(args.out), spec, args.data, args.calib_tokens)
    except (ValueError, CheckpointError) as error:
        print(f"moefold: error: {error}", file=sys.stderr)
        return 2
    widths = report["live_widths"]
    live = sum(sum(w["routed"]) + (w["shared"] or 0) for w in widths.values())
    print(
        f"moefold: wrote {args.out} ({spec.method}, ratio {spec.ratio}): {live} micro-experts "
        f"live in {len(widths)} MoE layers, stored width {report['stored_ffn_hidden']}"
    )
    return 0
