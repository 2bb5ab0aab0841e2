"""End-to-end training throughput: moefold's Trainer against a Hugging Face
`MixtralForCausalLM` of the same shape, same weights, same data, optimizer and dtype, one run.

    moefold bench train [--presets tiny-moe cpu-moe-1024] [--dtype fp32 bf16]
        [--steps 5 --warmup 2] [--hf-experts eager grouped_mm] [--threads N] [--row-budget-s S]
        [--set SECTION.FIELD=VALUE ...] [--json]

For every preset and dtype both models start from moefold's initial weights (exported with
moefold/interop/hf.py and loaded by transformers), draw the same micro-batches from two
`BatchLoader`s with the same seed, and take the same AdamW steps (same parameter groups, lr
schedule, betas, weight decay, eps and global-norm clipping). moefold's step is
`Trainer.train_step` (data, forward/backward, gradient reduction, clipping, optimizer, metrics);
Hugging Face's is the plain loop a user would write. Steps of the two alternate after the
warm-ups (`timing.time_interleaved`); figures are medians. Hugging Face gets one row per
experts implementation (`--hf-experts`; by default its per-expert loop and grouped_mm, which is
transformers 5's default), and `ratio_vs_hf` is against the fastest of them. MFU is the FLOPs of
moefold/model/size.py (the training MFU formula) over a torch.matmul peak measured in the same
run. The router losses are off on both sides (moe.aux_loss_coeff = moe.z_loss_coeff = 0): HF's
load-balancing loss is computed over all layers' logits at once and has no z-loss, so no
coefficient makes the two objectives equal; with them off the losses must agree.

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moefold.bench import bench_parser, timing
from moefold.bench.timing import Column
from moefold.config import JobConfig, load_job
from moefold.data import BatchLoader
from moefold.interop import hf
from moefold.model.size import flops_per_token
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.train.launch import build_trainer, init_distributed
from moefold.train.lr_schedule import lr_at
from moefold.train.trainer import Trainer

# Both objectives reduce to the token-mean LM loss (see the module docstring).
SAME_OBJECTIVE = ("moe.aux_loss_coeff=0", "moe.z_loss_coeff=0", "moe.capacity_factor=none")
COLUMNS = (
    Column("preset", "preset"),
    *timing.ROW_COLUMNS,
    Column("mfu_pct", "MFU %", ".1f"),
    Column("ratio_vs_hf", "ratio_vs_hf", ".2f"),
    Column("ratio_vs_hf_iqr", "paired_q1-q3", ".2f"),
    Column("step_ms", "step_ms", ".0f"),
    Column("steps", "steps"),
    Column("final_loss", "loss_after_N", ".5f"),
    Column("max_loss_diff", "max_abs_loss_diff", ".2e"),
)


@dataclass
class StepLog:
    """The loss of every step a model took (warm-ups included), in order."""

    losses: list[float]


def bench_job(preset: str, dtype_name: str, overrides: list[str], num_steps: int) -> JobConfig:
    """The preset with the router losses off, the dtype, and a schedule of `num_steps`."""
    return load_job(
        preset,
        [*SAME_OBJECTIVE, *overrides, f"train.dtype={dtype_name}", f"train.steps={num_steps}"],
    )


def moefold_step(trainer: Trainer, log: StepLog) -> Callable[[], None]:
    def step() -> None:
        log.losses.append(trainer.train_step()["loss"])

    return step


def hf_row_name(experts_impl: str) -> str:
    """`hf-mixtral` (the eager per-expert loop) or `hf-mixtral-<implementation>`."""
    return "hf-mixtral" if experts_impl == "eager" else f"hf-mixtral-{experts_impl}"


def transformers_default_experts() -> str:
    """The experts implementation transformers picks when the user names none."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tiny = MixtralConfig(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=8,
        num_local_experts=2,
    )
    return str(getattr(MixtralForCausalLM(tiny).config, "_experts_implementation", "eager"))


def build_hf_models(trainer: Trainer, job: JobConfig, experts_impls: list[str]) -> dict:
    """transformers' Mixtral holding moefold's current (initial) weights, fp32, training mode:
    one model per experts implementation, keyed by row name."""
    from transformers import MixtralForCausalLM

    models = {}
    with tempfile.TemporaryDirectory(prefix="moefold-bench-") as folder:
        hf.write_hf(hf.model_tensors(trainer.model), job.model, job.moe, folder)
        for impl in experts_impls:
            model = MixtralForCausalLM.from_pretrained(
                folder,
                dtype=torch.float32,
                attn_implementation="sdpa",
                experts_implementation=impl,
            )
            models[hf_row_name(impl)] = model.train()
    return models


class HFTrainStep:
    """The training step of a transformers model as a user writes it: micro-batch loop with
    gradient accumulation, clip_grad_norm_, fused AdamW (the transformers Trainer's default)
    with moefold's parameter groups and lr schedule."""

    def __init__(self, model: torch.nn.Module, job: JobConfig, dataset, log: StepLog) -> None:
        train = job.train
        self.model, self.train_cfg, self.log = model, train, log
        self.loader = BatchLoader(dataset, train.global_batch, train.micro_batch, train.seed)
        named = list(model.named_parameters())
        # moefold's rule (parallel/optimizer.py): decay matrices, never the embedding table.
        decay = [p for n, p in named if p.ndim >= 2 and "embed_tokens" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed_tokens" not in n)]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=train.lr,
            betas=(train.beta1, train.beta2),
            eps=train.eps,
            fused=True,  # transformers' Trainer default on torch >= 2.8 (adamw_torch_fused)
        )
        self.num_microbatches = train.global_batch // train.micro_batch
        self.step_index = 0

    def autocast(self):
        enabled = self.train_cfg.dtype == "bf16"
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    def __call__(self) -> None:
        total = 0.0
        for batch_BS1 in self.loader.next_batch():
            inputs_BS, labels_BS = batch_BS1[:, :-1], batch_BS1[:, 1:]
            with self.autocast():
                logits_BSV = self.model(input_ids=inputs_BS).logits
                loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten())
            (loss / self.num_microbatches).backward()
            total += float(loss.detach())
        if self.train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step_index, self.train_cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        self.log.losses.append(total / self.num_microbatches)


def run_case(args: argparse.Namespace, preset: str, dtype_name: str) -> list[dict]:
    """moefold and HF rows of one preset at one dtype."""
    num_steps = args.warmup + args.steps
    job = bench_job(preset, dtype_name, args.overrides, num_steps)
    hf.hf_family(job.model, job.moe)  # a ValueError here: no transformers model of this shape
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, 1))
    with tempfile.TemporaryDirectory(prefix="moefold-bench-run-") as out_dir:
        trainer = build_trainer(job, groups, Path(out_dir), torch.device("cpu"))
        hf_models = build_hf_models(trainer, job, args.hf_experts)
        logs = {name: StepLog([]) for name in ["moefold", *hf_models]}
        steps = {"moefold": moefold_step(trainer, logs["moefold"])}
        for name, model in hf_models.items():
            steps[name] = HFTrainStep(model, job, trainer.loader.dataset, logs[name])
        timing.progress(f"{preset} {dtype_name}: {num_steps} steps per model")
        seconds = timing.time_interleaved(
            steps, args.steps, args.warmup, budget_s=args.row_budget_s
        )
    tokens_per_step = job.train.global_batch * job.train.seq_len
    step_flops = flops_per_token(job.model, job.moe, job.train.seq_len) * tokens_per_step
    # Over the steps both models took (a row cut short by --row-budget-s took fewer).
    max_diff = max(
        abs(a - b)
        for name in hf_models
        for a, b in timing.same_round_pairs(logs["moefold"].losses, logs[name].losses)
    )
    fastest_hf = min(hf_models, key=lambda name: timing.median(seconds[name]))
    hf_s = timing.median(seconds[fastest_hf])
    rows = []
    for name, step_s_all in seconds.items():
        step_s = timing.median(step_s_all)
        rows.append(
            {
                "preset": preset,
                "name": name,
                "dtype": dtype_name,
                "ep": 1,
                "tokens_per_s": tokens_per_step / step_s,
                "tflops": step_flops / step_s / 1e12,
                "ratio_vs_hf": hf_s / step_s,
                "ratio_vs_hf_iqr": timing.paired_ratio_quartiles(seconds[fastest_hf], step_s_all),
                "step_ms": 1e3 * step_s,
                "steps": len(logs[name].losses),
                "final_loss": logs[name].losses[-1],
                "max_loss_diff": max_diff,
                "losses": logs[name].losses,
                "step_s_all": step_s_all,
                "step_flops": step_flops,
            }
        )
    del trainer, hf_models, steps
    gc.collect()
    return rows


def header(args: argparse.Namespace, peaks: dict[str, float]) -> dict:
    import transformers

    env = timing.environment()
    return {
        "benchmark": "moefold bench train: full training steps, moefold Trainer vs transformers "
        "MixtralForCausalLM (same weights, data, AdamW, lr schedule, clipping, dtype), ep=1",
        "timing": f"median of {args.steps} timed steps after {args.warmup} warm-ups, the "
        "models interleaved step by step; ratio_vs_hf = the fastest HF row's step time / row "
        "step time; paired_q1-q3 = quartiles of that ratio taken step by step"
        + timing.row_budget_note(args.row_budget_s),
        "losses": "loss_after_N = loss of the row's last step (steps = warm-ups + timed steps, "
        f"{args.warmup + args.steps} unless --row-budget-s cut the row short); "
        "max_abs_loss_diff = moefold vs every HF row over the steps both took; router aux and "
        "z losses off on both sides (no HF coefficient matches)",
        "hf": f"experts_implementation {' and '.join(args.hf_experts)} (one row each; "
        f"transformers {transformers.__version__} defaults to "
        f"{transformers_default_experts()}), attn_implementation=sdpa, "
        "torch.optim.AdamW(fused=True) as transformers' Trainer defaults to",
        "bf16": "fp32 parameters, forward under torch.autocast(cpu, bf16) (train.dtype=bf16)",
        "environment": f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}, "
        f"python {env['python']}",
        "host memory": args.host_memory,
        "peak": ", ".join(f"{name} {flops / 1e9:.1f} GFLOP/s" for name, flops in peaks.items())
        + f" (torch.matmul {args.peak_size}^3, best of 1 s before and 1 s after the rows; "
        "dtypes whose products run on the same GEMM kernel share the best reading)",
    }


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("train", __doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny-moe", "cpu-moe-1024"])
    parser.add_argument("--dtype", nargs="+", choices=list(timing.DTYPES), default=["fp32"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument(
        "--hf-experts",
        nargs="+",
        default=["eager", "grouped_mm"],
        choices=["eager", "grouped_mm", "batched_mm"],
        help="transformers experts implementations, one HF row each (grouped_mm is "
        "transformers 5's default)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override applied to every preset (after the bench's own)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads for both models (0 = as is)"
    )
    timing.add_row_budget_flag(
        parser,
        "For HF's bf16 rows on a CPU without bf16 instructions, which run 7-22x slower than "
        "moefold and stretch a run to an hour",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the peak matmul")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    timing.add_host_memory_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.peak_size < 1 or args.threads < 0:
        parser.error("--steps and --peak-size must be >= 1, --warmup and --threads >= 0")
    timing.check_row_budget(parser, args)
    args.hf_experts = list(dict.fromkeys(args.hf_experts))
    args.host_memory = timing.apply_host_memory(args)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads_before)
    peaks, rows = {}, []
    with contextlib.redirect_stdout(sys.stderr):
        init_distributed(torch.device("cpu"))  # a one-rank gloo group for the Trainer
        try:
            for dtype_name in dict.fromkeys(args.dtype):
                dtype = timing.DTYPES[dtype_name]
                timing.progress(f"{dtype_name}: measuring the torch.matmul peak")
                peak = timing.measure_peak(dtype, args.peak_size)
                for preset in args.presets:
                    rows.extend(run_case(args, preset, dtype_name))
                peaks[dtype_name] = max(peak, timing.measure_peak(dtype, args.peak_size))
        finally:
            dist.destroy_process_group()
    peaks = timing.pool_peaks(peaks)
    timing.add_share_of_peak(rows, peaks, "mfu_pct")
    info = header(args, peaks)
    torch.set_num_threads(threads_before)
    timing.print_report(info, rows, COLUMNS, args.json, peak_flops=peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
