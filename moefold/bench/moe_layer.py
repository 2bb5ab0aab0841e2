"""Forward + backward of one MoE layer against a dense MLP of the same FLOPs and other
libraries' MoE blocks, in one process (ep = 1) and on ep gloo ranks, as one table measured in
one run.

    moefold bench moe-layer [--tokens 4096 --hidden 1024 --ffn 3584 --experts 8
        --topk 2] [--dtype fp32 bf16] [--ep 1 2 4] [--steps 7 --warmup 2]
        [--capacity-factor none 1.0] [--bf16-workload auto|full|small|both]
        [--row-budget-s S] [--json]

Every row gets the same input and the same pre-made contiguous output gradient (so no backward
sees a zero-stride gradient), and every MoE row gets the same router and expert weights, so all
routers send the same tokens to the same experts. Steps are timed round-robin after the warm-ups
(`timing.time_interleaved`) and reported as medians, next to a torch.matmul peak measured in the
same run at the same dtype and thread count.

Rows at ep > 1 come from moefold/bench/moe_layer_ep.py; the other libraries' builders from
moefold/bench/peers.py.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, F expert FFN hidden,
E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moefold.bench import bench_parser, peers, timing
from moefold.bench.timing import Column
from moefold.bench.workload import INIT_STD, ExpertWeights, Workload, random_weights
from moefold.config import GROUPED_MM_ROW_MULTIPLE, MoEConfig, grouped_mm_rows_aligned
from moefold.kernels.gemm import cpu_bf16_gemm_is_slow, set_bf16_gemm
from moefold.model.moe import MoELayer
from moefold.model.transformer import DenseMLP

NAME, *OTHER_ROW_COLUMNS = timing.ROW_COLUMNS
COLUMNS = (
    NAME,
    Column("shape", "shape"),
    *OTHER_ROW_COLUMNS,
    Column("pct_of_peak", "pct_of_peak", ".1f"),
    Column("ratio_vs_dense", "ratio_vs_dense", ".3f"),
    Column("ratio_vs_dense_iqr", "paired_q1-q3", ".2f"),
    Column("ratio_vs_best_peer", "ratio_vs_best_peer", ".3f"),
    Column("step_ms", "step_ms", ".1f"),
    Column("timed", "timed"),
)


@dataclass(frozen=True)
class Section:
    """Rows measured together: one dtype, one workload ("full" = the command line's shape,
    "small" = the reduced bf16 shape), with or without the other libraries' rows."""

    dtype_name: str
    shape: str
    workload: Workload
    with_peers: bool


@torch.no_grad()
def _fill_normal(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    return module


def build_dense(workload: Workload, seed: int) -> nn.Module:
    """A SwiGLU MLP with hidden topk * ffn_hidden: the FLOPs of the MoE layer minus the router."""
    return _fill_normal(DenseMLP(workload.hidden, workload.topk * workload.ffn_hidden), seed)


@torch.no_grad()
def build_moefold(
    workload: Workload, weights: ExpertWeights, capacity_factor: float | None
) -> nn.Module:
    """MoELayer with a Mixtral-style router (softmax over the top-k logits) and default losses."""
    cfg = MoEConfig(
        num_experts=workload.num_experts,
        topk=workload.topk,
        ffn_hidden=workload.ffn_hidden,
        capacity_factor=capacity_factor,
    )
    layer = MoELayer(workload.hidden, cfg)
    layer.router.weight.copy_(weights.router_ED)
    layer.experts.gate_proj.copy_(weights.gate_EDF)
    layer.experts.up_proj.copy_(weights.up_EDF)
    layer.experts.down_proj.copy_(weights.down_EFD)
    return layer


def moefold_row_name(capacity_factor: float | None) -> str:
    """`moefold` (dropless) or `moefold-cf<factor>`."""
    return "moefold" if capacity_factor is None else f"moefold-cf{capacity_factor:g}"


@dataclass(frozen=True)
class Candidate:
    name: str
    build: Callable[[], nn.Module]
    step_flops: int
    optional: bool = False  # third-party row: skipped when its package is missing or breaks


def build_moefold_native_bf16(workload: Workload, weights: ExpertWeights) -> nn.Module:
    """moefold with torch's own bf16 kernels (train.bf16_gemm=native): the upcast's control."""
    layer = build_moefold(workload, weights, None)
    set_bf16_gemm(layer, "native")
    return layer


def candidates(args: argparse.Namespace, section: Section) -> list[Candidate]:
    """The rows of one ep = 1 section, dense first (the ratio's denominator)."""
    workload = section.workload
    weights = random_weights(workload, args.seed)
    moe_flops = workload.moe_step_flops()
    dense = Candidate(
        "dense", lambda: build_dense(workload, args.seed), workload.dense_step_flops()
    )
    rows = [dense]
    for cf in args.capacity_factor:
        build = lambda cf=cf: build_moefold(workload, weights, cf)  # noqa: E731
        rows.append(Candidate(moefold_row_name(cf), build, moe_flops))
    if not section.with_peers:
        return rows
    if section.dtype_name == "bf16" and cpu_bf16_gemm_is_slow():
        make = lambda: build_moefold_native_bf16(workload, weights)  # noqa: E731
        rows.append(Candidate("moefold-native-bf16", make, moe_flops))
    hf_blocks = (("hf-mixtral", peers.build_hf_mixtral), ("hf-qwen3-moe", peers.build_hf_qwen3_moe))
    aligned = grouped_mm_rows_aligned(workload.hidden, workload.ffn_hidden)
    hf_experts = args.hf_experts
    if importlib.util.find_spec("transformers") is None:
        timing.progress(f"skipped hf-mixtral, hf-qwen3-moe: {_MISSING.format('transformers')}")
        hf_experts = []
    for impl in hf_experts:
        if impl == "grouped_mm" and not aligned:
            multiple = GROUPED_MM_ROW_MULTIPLE
            timing.progress(f"skipped HF {impl}: hidden and ffn must be multiples of {multiple}")
            continue
        suffix = "" if impl == "eager" else f"-{impl}"
        for name, build in hf_blocks:
            make = lambda b=build, impl=impl: b(workload, weights, impl)  # noqa: E731
            rows.append(Candidate(name + suffix, make, moe_flops))
    for package, build in (
        ("torchtitan", peers.build_torchtitan),
        ("deepspeed", peers.build_deepspeed),
    ):
        if importlib.util.find_spec(package) is not None:
            rows.append(Candidate(package, lambda b=build: b(workload, weights), moe_flops, True))
        else:
            timing.progress(f"skipped {package}: {_MISSING.format(package)}")
    return rows


# Peers are optional: a missing package skips its rows (said on stderr), never the benchmark.
_MISSING = "{} is not installed (pip install -e '.[bench]'; torchtitan by hand)"


def make_step(
    module: nn.Module,
    x_BSD: torch.Tensor,
    grad_by_dtype: dict[torch.dtype, torch.Tensor],
    autocast_dtype: torch.dtype | None,
) -> Callable[[], None]:
    """One training step of `module` without the optimizer: zero grads, forward, backward."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x_BSD.grad = None
        autocast = torch.autocast(
            "cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        )
        with autocast:
            out = module(x_BSD)
        out = out[0] if isinstance(out, tuple) else out  # DeepSpeed returns (out, l_aux, counts)
        out.backward(grad_by_dtype[out.dtype])

    return step


def build_modules(
    rows: Sequence[Candidate], param_dtype: torch.dtype
) -> dict[str, tuple[nn.Module, int]]:
    modules = {}
    for row in rows:
        timing.progress(f"building {row.name}")
        try:
            module = row.build()
        except Exception as error:  # noqa: BLE001 - a third-party API drift must not end the run
            if not row.optional:
                raise
            timing.progress(f"skipped {row.name}: {type(error).__name__}: {error}")
            continue
        modules[row.name] = (module.to(param_dtype).train(), row.step_flops)
    return modules


def step_inputs(workload: Workload, param_dtype: torch.dtype, seed: int):
    """The input (a leaf wanting a gradient) and one contiguous output gradient per dtype."""
    generator = torch.Generator().manual_seed(seed)
    shape = (workload.batch, workload.seq, workload.hidden)
    x_BSD = torch.randn(shape, generator=generator).to(param_dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator)
    return x_BSD, {d: grad.to(d).contiguous() for d in (torch.float32, torch.bfloat16)}


def param_dtype_of(args: argparse.Namespace, dtype_name: str) -> tuple[torch.dtype, bool]:
    """(parameter dtype, autocast on) of a dtype section."""
    autocast = dtype_name == "bf16" and args.bf16_mode == "autocast"
    return (torch.float32 if autocast else timing.DTYPES[dtype_name]), autocast


def run_section(args: argparse.Namespace, section: Section) -> list[dict]:
    """Every ep = 1 row of one section, timed round-robin."""
    param_dtype, autocast = param_dtype_of(args, section.dtype_name)
    modules = build_modules(candidates(args, section), param_dtype)
    x_BSD, grad_by_dtype = step_inputs(section.workload, param_dtype, args.seed + 1)
    autocast_dtype = torch.bfloat16 if autocast else None
    steps = {
        name: make_step(module, x_BSD, grad_by_dtype, autocast_dtype)
        for name, (module, _) in modules.items()
    }
    timing.progress(f"{section.dtype_name} {section.shape} ep1: {', '.join(steps)}")
    seconds = timing.time_interleaved(steps, args.steps, args.warmup, budget_s=args.row_budget_s)
    flops = {name: step_flops for name, (_, step_flops) in modules.items()}
    del modules, steps
    gc.collect()
    return section_rows(seconds, flops, section, ep=1)


def run_section_in_fresh_process(args: argparse.Namespace, section: Section) -> list[dict]:
    """`run_section` in a new (spawned) Python process, as each ep > 1 section runs in its own
    ranks: no section inherits the heap an earlier one left. Measured in one process, the bf16
    rows after the fp32 section ran slower and further apart (dense 709-720 ms against 648-709
    alone, moefold 815-851 against 690-738, HF grouped_mm 814-837 against 712-767;
    docs/decisions.md, Performance on CPU). Spawned, not forked: a fork after the parent's OpenMP
    threads ran can hang the child's first parallel region (GNU libgomp)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_section_child, (args, section))


def _section_child(args: argparse.Namespace, section: Section) -> list[dict]:
    timing.apply_host_memory(args)  # the run's host-memory policy, in this process too
    try:
        # Third-party builders print progress to stdout; the parent prints the table there.
        with contextlib.redirect_stdout(sys.stderr):
            return run_section(args, section)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the DeepSpeed row's 1-rank group


def section_rows(
    seconds: dict[str, list[float]], step_flops: dict[str, int], section: Section, ep: int
) -> list[dict]:
    """Rows of one (section, ep); ratios against its dense row and its fastest peer."""
    medians = {name: timing.median(values) for name, values in seconds.items()}
    peer_s = [s for name, s in medians.items() if name != "dense" and "moefold" not in name]
    rows = []
    for name, step_s in medians.items():
        rows.append(
            {
                "name": name,
                "shape": section.shape,
                "dtype": section.dtype_name,
                "ep": ep,
                "tokens_per_s": section.workload.num_tokens / step_s,
                "tflops": step_flops[name] / step_s / 1e12,
                "ratio_vs_dense": medians["dense"] / step_s,
                "ratio_vs_dense_iqr": timing.paired_ratio_quartiles(
                    seconds["dense"], seconds[name]
                ),
                "ratio_vs_best_peer": min(peer_s) / step_s if peer_s else None,
                "step_ms": 1e3 * step_s,
                "timed": len(seconds[name]),
                "step_s_all": seconds[name],
                "step_flops": step_flops[name],
            }
        )
    return rows


ROW_NOTES = {
    "moefold": "MoELayer in training mode: aux loss (coeff 0.01) on, shared expert off; ep > 1: "
    "all-to-all dispatcher",
    "moefold-cf1": "capacity factor 1.0: an expert keeps at most ceil(T*K/E) of its tokens "
    "(the highest-probability ones; ep > 1: per source rank, over its own tokens), no padding; "
    "tflops counts the dropless FLOPs",
    "moefold-native-bf16": "moefold with train.bf16_gemm=native: torch's bf16 kernels, which "
    "this CPU runs without bf16 instructions (the other moefold rows compute bf16 products as "
    "fp32 GEMMs, moefold/kernels/gemm.py)",
    "dense": "moefold's DenseMLP, same FLOPs minus the router; ep > 1: each rank on its tokens",
    "hf-mixtral": "transformers experts forward picked by --hf-experts (eager = per-expert loop)",
    "torchtitan": "experts always compute in bf16 grouped_mm, so its fp32 row is bf16 math",
    "deepspeed": "drop_tokens=False, no 2nd-expert Gumbel sampling; l_aux not back-propagated; "
    "ep > 1: ep_size = ep",
}


def _describe(workload: Workload) -> str:
    return (
        f"tokens {workload.num_tokens} (batch {workload.batch} x seq {workload.seq}), "
        f"hidden {workload.hidden}, expert ffn {workload.ffn_hidden} SwiGLU, "
        f"{workload.num_experts} experts, top-{workload.topk} softmax router; "
        f"dense ffn {workload.topk * workload.ffn_hidden}; model FLOPs per step "
        f"{workload.moe_step_flops() / 1e9:.1f} GFLOP (2*m*n*k per matmul, x3 for fwd+bwd)"
    )


def header(
    args: argparse.Namespace, sections: list[Section], peaks: dict[str, float], names: set[str]
) -> dict:
    env = timing.environment()
    bf16 = (
        "bf16 parameters and inputs (no autocast, no fp32 master weights)"
        if args.bf16_mode == "params"
        else "fp32 parameters and inputs under torch.autocast(cpu, bf16)"
    )
    shapes = {section.shape: section.workload for section in sections}
    peak_dtypes = {name: timing.peak_matmul_dtype(timing.DTYPES[name]) for name in peaks}
    info = {
        "benchmark": "moefold bench moe-layer: forward + backward of one layer; ep > 1 = ep gloo "
        "ranks splitting the same tokens; every section (dtype, shape, ep) in fresh processes",
        "timing": f"median of {args.steps} timed steps after {args.warmup} warm-ups, rows "
        "interleaved step by step (slowest rank's median at ep > 1)"
        + timing.row_budget_note(args.row_budget_s, "at ep = 1 ", " (timed column)")
        + "; ratio_vs_dense = dense "
        "step time / row step time; paired_q1-q3 = quartiles of the same ratio taken step by "
        "step within a round (how far the noise reaches); ratio_vs_best_peer = fastest other "
        "library / row, same shape, dtype and ep",
        **{f"shape {name}": _describe(workload) for name, workload in shapes.items()},
        "bf16": bf16,
        "environment": f"torch {env['torch']}, {env['threads']} threads at ep = 1 and 1 thread "
        f"per rank at ep > 1 (ranks share the cores), {env['cpu']}, python {env['python']}",
        "host memory": args.host_memory,
        "peak": ", ".join(
            f"{name} {flops / 1e9:.1f} GFLOP/s"
            + (
                " (fp32 GEMMs: no bf16 instructions)"
                if peak_dtypes[name] != timing.DTYPES[name]
                else ""
            )
            for name, flops in peaks.items()
        )
        + f" (torch.matmul {args.peak_size}^3, best of 1 s before and 1 s after the rows; "
        "dtypes whose products run on the same GEMM kernel share the best reading)",
    }
    if any(not section.with_peers for section in sections):
        info["bf16 shapes"] = (
            "this CPU has no bf16 instructions: torch's bf16 kernels, which the other libraries "
            "use, run far below the fp32 rate here (0.3-1.3 GFLOP/s on AVX2 CPUs, ~60 on an "
            "AVX-512 Xeon; the moefold-native-bf16 row shows this one), so they are timed on "
            "the small shape; the full bf16 shape has the dense and moefold rows only"
        )
    return {**info, **{f"note {name}": note for name, note in ROW_NOTES.items() if name in names}}


def plan_sections(args: argparse.Namespace, workload: Workload) -> list[Section]:
    """The sections of the run, in table order. bf16 under --bf16-workload: `full` (peers on
    the command line's shape), `small` (peers on tokens / 4, hidden / 2, ffn / 2: 1/16 of the
    FLOPs), `both` (full shape without peers, then small with them); `auto` is `both` on a
    CPU without bf16 instructions (torch's bf16 kernels run far below the fp32 rate there) and
    `full` elsewhere."""
    small = dataclasses.replace(
        workload,
        seq=workload.seq // 4,
        hidden=max(1, workload.hidden // 2),
        ffn_hidden=max(1, workload.ffn_hidden // 2),
    )
    mode = args.bf16_workload
    if mode == "auto":
        mode = "both" if cpu_bf16_gemm_is_slow() else "full"
    sections = []
    for dtype_name in dict.fromkeys(args.dtype):
        if dtype_name != "bf16" or mode == "full":
            sections.append(Section(dtype_name, "full", workload, with_peers=True))
            continue
        if mode == "both":
            sections.append(Section(dtype_name, "full", workload, with_peers=False))
        sections.append(Section(dtype_name, "small", small, with_peers=True))
    return sections


def run_all(args: argparse.Namespace, sections: list[Section]) -> list[dict]:
    """Every section's rows, each section in its own processes; ep > 1 runs first, and the
    rows come back ordered by section, ep = 1 first."""
    from moefold.bench import moe_layer_ep  # it imports this module

    rows = []
    # Third-party builders print progress to stdout; keep stdout for the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        # ep > 1 first: its ranks fork from a parent that holds no process group yet.
        for ep in (ep for ep in args.ep if ep > 1):
            for section in sections:
                rows.extend(moe_layer_ep.run_section(args, section, ep))
        if 1 in args.ep:
            for section in sections:
                rows.extend(run_section_in_fresh_process(args, section))
    order = [(section.dtype_name, section.shape) for section in sections]
    return sorted(rows, key=lambda row: (order.index((row["dtype"], row["shape"])), row["ep"]))


def _capacity_factor(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("capacity factor must be > 0 or 'none' (dropless)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("moe-layer", __doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch*seq)")
    parser.add_argument("--batch", type=int, default=2, help="sequences the tokens form")
    parser.add_argument("--hidden", type=int, default=1024, help="model dim D")
    parser.add_argument("--ffn", type=int, default=3584, help="SwiGLU hidden of one expert")
    parser.add_argument("--experts", type=int, default=8, help="routed experts E")
    parser.add_argument("--topk", type=int, default=2, help="experts per token K")
    parser.add_argument("--dtype", nargs="+", choices=list(timing.DTYPES), default=["fp32", "bf16"])
    parser.add_argument(
        "--bf16-mode",
        choices=["params", "autocast"],
        default="params",
        help="bf16 rows: bf16 parameters and inputs, or fp32 under autocast",
    )
    parser.add_argument("--steps", type=int, default=7, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    parser.add_argument(
        "--capacity-factor",
        nargs="+",
        type=_capacity_factor,
        default=[None, 1.0],
        metavar="CF",
        help="one moefold row per value; 'none' = dropless (default: dropless and 1.0)",
    )
    parser.add_argument(
        "--hf-experts",
        nargs="+",
        default=["eager", "grouped_mm"],
        choices=["eager", "grouped_mm", "batched_mm"],
        help="transformers experts implementations to time, one row per block each "
        "(grouped_mm is transformers 5's default)",
    )
    parser.add_argument(
        "--ep",
        nargs="+",
        type=int,
        default=[1, 2, 4],
        help="expert-parallel sizes; ep > 1 splits the tokens over ep gloo ranks",
    )
    parser.add_argument(
        "--bf16-workload",
        choices=["auto", "full", "small", "both"],
        default="auto",
        help="bf16 shape(s), see plan_sections: full, small (tokens/4, hidden/2, ffn/2) or both "
        "(full without the other libraries); auto = both on a CPU without bf16 instructions",
    )
    timing.add_row_budget_flag(
        parser,
        "ep = 1 sections only (ranks all run every step). For the other libraries' bf16 rows "
        "on a CPU without bf16 instructions, 13-15 s a step at the small shape",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the peak matmul")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    timing.add_host_memory_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("tokens", "batch", "hidden", "ffn", "experts", "topk", "steps", "peak_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    timing.check_row_budget(parser, args)
    if args.tokens % args.batch:
        parser.error(f"--tokens {args.tokens} is not divisible by --batch {args.batch}")
    if args.topk > args.experts:
        parser.error(f"--topk {args.topk} is larger than --experts {args.experts}")
    workload = Workload(
        batch=args.batch,
        seq=args.tokens // args.batch,
        hidden=args.hidden,
        ffn_hidden=args.ffn,
        num_experts=args.experts,
        topk=args.topk,
    )
    bad_ep = [ep for ep in args.ep if ep < 1 or args.experts % ep or args.tokens % (4 * ep)]
    if bad_ep:
        parser.error(f"--ep {bad_ep}: each ep must divide --experts and --tokens / 4")
    args.host_memory = timing.apply_host_memory(args)
    sections = plan_sections(args, workload)
    # The peak before and after the rows, the better one kept: a neighbour that was busy during
    # one second of peak measurement must not inflate every pct_of_peak.
    dtypes = dict.fromkeys(section.dtype_name for section in sections)
    peaks = {name: timing.measure_peak(timing.DTYPES[name], args.peak_size) for name in dtypes}
    rows = run_all(args, sections)
    for name, peak in peaks.items():
        peaks[name] = max(peak, timing.measure_peak(timing.DTYPES[name], args.peak_size))
    peaks = timing.pool_peaks(peaks)
    timing.add_share_of_peak(rows, peaks, "pct_of_peak")
    info = header(args, sections, peaks, {row["name"] for row in rows})
    timing.print_report(info, rows, COLUMNS, args.json, peak_flops=peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
