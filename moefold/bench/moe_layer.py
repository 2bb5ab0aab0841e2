"""Forward + backward of one MoE layer against a dense MLP of the same FLOPs and other
libraries' MoE blocks, in one process (ep = 1), as one table measured in one run.

    python -m moefold.bench.moe_layer [--tokens 4096 --hidden 1024 --ffn 3584 --experts 8
        --topk 2] [--dtype fp32 bf16] [--steps 5 --warmup 2] [--capacity-factor none 1.0] [--json]

Every row gets the same input and the same pre-made contiguous output gradient (so no backward
sees a zero-stride gradient), and every MoE row gets the same router and expert weights, so all
routers send the same tokens to the same experts. Steps are timed round-robin after the warm-ups
(`timing.time_interleaved`) and reported as medians, next to a torch.matmul peak measured in the
same run at the same dtype and thread count.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, F expert FFN hidden,
E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moefold.bench import timing
from moefold.bench.timing import Column
from moefold.config import MoEConfig
from moefold.model.moe import MoELayer
from moefold.model.transformer import DenseMLP

INIT_STD = 0.02
COLUMNS = (
    *timing.ROW_COLUMNS,
    Column("pct_of_peak", "pct_of_peak", ".1f"),
    Column("ratio_vs_dense", "ratio_vs_dense", ".3f"),
    Column("step_ms", "step_ms", ".1f"),
)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The layer shape and the tokens of one step."""

    batch: int
    seq: int
    hidden: int
    ffn_hidden: int  # one routed expert; the dense MLP gets topk * ffn_hidden
    num_experts: int
    topk: int

    @property
    def num_tokens(self) -> int:
        return self.batch * self.seq

    def moe_step_flops(self) -> int:
        """Model FLOPs of forward + backward: router + K experts x 3 matmuls, times 3."""
        T, D = self.num_tokens, self.hidden
        router = 2 * T * D * self.num_experts
        experts = self.topk * 3 * 2 * T * D * self.ffn_hidden
        return 3 * (router + experts)

    def dense_step_flops(self) -> int:
        return 3 * 3 * 2 * self.num_tokens * self.hidden * self.topk * self.ffn_hidden


@dataclass(frozen=True)
class ExpertWeights:
    """One set of router and expert weights (fp32) that every MoE row copies."""

    router_ED: torch.Tensor
    gate_EDF: torch.Tensor
    up_EDF: torch.Tensor
    down_EFD: torch.Tensor


def random_weights(workload: Workload, seed: int) -> ExpertWeights:
    generator = torch.Generator().manual_seed(seed)
    E, D, F = workload.num_experts, workload.hidden, workload.ffn_hidden

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * INIT_STD

    return ExpertWeights(normal(E, D), normal(E, D, F), normal(E, D, F), normal(E, F, D))


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


@torch.no_grad()
def _load_hf_experts(block: nn.Module, weights: ExpertWeights) -> nn.Module:
    # transformers stores [gate; up] as (E, 2F, D) and down as (E, D, F), i.e. nn.Linear layout.
    block.gate.weight.copy_(weights.router_ED)
    gate_up = torch.cat([weights.gate_EDF.transpose(1, 2), weights.up_EDF.transpose(1, 2)], 1)
    block.experts.gate_up_proj.copy_(gate_up)
    block.experts.down_proj.copy_(weights.down_EFD.transpose(1, 2))
    return block


def build_hf_mixtral(workload: Workload, weights: ExpertWeights, experts_impl: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=workload.hidden,
        intermediate_size=workload.ffn_hidden,
        num_local_experts=workload.num_experts,
        num_experts_per_tok=workload.topk,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = experts_impl
    return _load_hf_experts(MixtralSparseMoeBlock(config), weights)


def build_hf_qwen3_moe(workload: Workload, weights: ExpertWeights, experts_impl: str) -> nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=workload.hidden,
        moe_intermediate_size=workload.ffn_hidden,
        num_experts=workload.num_experts,
        num_experts_per_tok=workload.topk,
        norm_topk_prob=True,
    )
    config._experts_implementation = experts_impl
    return _load_hf_experts(Qwen3MoeSparseMoeBlock(config), weights)


@torch.no_grad()
def build_torchtitan(workload: Workload, weights: ExpertWeights) -> nn.Module:
    """torchtitan's MoE (0.3 Config API); its experts always compute in bf16 grouped_mm."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    E, D, F, K = workload.num_experts, workload.hidden, workload.ffn_hidden, workload.topk
    config = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=D, out_features=E),
            top_k=K,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
    )
    moe = config.build()
    moe.router.gate.weight.copy_(weights.router_ED)
    experts = moe.routed_experts.inner_experts
    experts.w1_EFD.copy_(weights.gate_EDF.transpose(1, 2))
    experts.w3_EFD.copy_(weights.up_EDF.transpose(1, 2))
    experts.w2_EDF.copy_(weights.down_EFD.transpose(1, 2))
    return moe


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.up_proj = nn.Linear(hidden, ffn_hidden, bias=False)
        self.down_proj = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def build_deepspeed(workload: Workload, weights: ExpertWeights) -> nn.Module:
    """DeepSpeed's MoE, dropless (drop_tokens=False), on a world-size-1 gloo group."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    moe = MoE(
        workload.hidden,
        _SwiGLU(workload.hidden, workload.ffn_hidden),
        num_experts=workload.num_experts,
        ep_size=1,
        k=workload.topk,
        drop_tokens=False,
        top2_2nd_expert_sampling=False,
    )
    moe.set_deepspeed_parallelism()
    moe.deepspeed_moe.gate.wg.weight.copy_(weights.router_ED)
    for index, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        expert.gate_proj.weight.copy_(weights.gate_EDF[index].T)
        expert.up_proj.weight.copy_(weights.up_EDF[index].T)
        expert.down_proj.weight.copy_(weights.down_EFD[index].T)
    return moe


@dataclass(frozen=True)
class Candidate:
    name: str
    build: Callable[[], nn.Module]
    step_flops: int
    optional: bool = False  # third-party row: skipped when its package is missing or breaks


def candidates(args: argparse.Namespace, workload: Workload) -> list[Candidate]:
    """The rows of one dtype section, dense first (the ratio's denominator)."""
    weights = random_weights(workload, args.seed)
    moe_flops = workload.moe_step_flops()
    dense = Candidate(
        "dense", lambda: build_dense(workload, args.seed), workload.dense_step_flops()
    )
    rows = [dense]
    for cf in args.capacity_factor:
        name = "moefold" if cf is None else f"moefold-cf{cf:g}"
        rows.append(Candidate(name, lambda cf=cf: build_moefold(workload, weights, cf), moe_flops))
    for impl in args.hf_experts:
        suffix = "" if impl == "eager" else f"-{impl}"
        for name, build in (("hf-mixtral", build_hf_mixtral), ("hf-qwen3-moe", build_hf_qwen3_moe)):
            make = lambda b=build, impl=impl: b(workload, weights, impl)  # noqa: E731
            rows.append(Candidate(name + suffix, make, moe_flops))
    for package, build in (("torchtitan", build_torchtitan), ("deepspeed", build_deepspeed)):
        if importlib.util.find_spec(package) is not None:
            rows.append(Candidate(package, lambda b=build: b(workload, weights), moe_flops, True))
    return rows


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


def _build_modules(
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


def run_dtype(args: argparse.Namespace, workload: Workload, dtype_name: str) -> tuple[float, list]:
    """Peak and result rows of one dtype section."""
    dtype = timing.DTYPES[dtype_name]
    autocast = dtype == torch.bfloat16 and args.bf16_mode == "autocast"
    param_dtype = torch.float32 if autocast else dtype
    timing.progress(f"{dtype_name}: measuring the torch.matmul peak")
    peak = timing.measure_peak(dtype, args.peak_size)
    modules = _build_modules(candidates(args, workload), param_dtype)
    generator = torch.Generator().manual_seed(args.seed + 1)
    shape = (workload.batch, workload.seq, workload.hidden)
    x_BSD = torch.randn(shape, generator=generator).to(param_dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator)  # contiguous, one per output dtype
    grad_by_dtype = {d: grad.to(d).contiguous() for d in (torch.float32, torch.bfloat16)}
    steps = {
        name: make_step(module, x_BSD, grad_by_dtype, dtype if autocast else None)
        for name, (module, _) in modules.items()
    }
    seconds = timing.time_interleaved(steps, args.steps, args.warmup)
    # Measure the peak again after the rows and keep the better one: a neighbour that was busy
    # during one second of peak measurement must not inflate every pct_of_peak.
    peak = max(peak, timing.measure_peak(dtype, args.peak_size))
    dense_s = timing.median(seconds["dense"])
    rows = []
    for name, (_, step_flops) in modules.items():
        step_s = timing.median(seconds[name])
        rows.append(
            {
                "name": name,
                "dtype": dtype_name,
                "ep": 1,
                "tokens_per_s": workload.num_tokens / step_s,
                "tflops": step_flops / step_s / 1e12,
                "pct_of_peak": 100.0 * step_flops / step_s / peak,
                "ratio_vs_dense": dense_s / step_s,
                "step_ms": 1e3 * step_s,
                "step_s_all": seconds[name],
                "step_flops": step_flops,
            }
        )
    del modules, steps
    gc.collect()
    return peak, rows


ROW_NOTES = {
    "moefold": "MoELayer in training mode: aux loss (coeff 0.01) on, shared expert off",
    "hf-mixtral": "transformers experts forward picked by --hf-experts (eager = per-expert loop)",
    "torchtitan": "experts always compute in bf16 grouped_mm, so its fp32 row is bf16 math",
    "deepspeed": "drop_tokens=False, no 2nd-expert Gumbel sampling; l_aux not back-propagated",
}


def header(
    args: argparse.Namespace, workload: Workload, peaks: dict[str, float], names: set[str]
) -> dict:
    env = timing.environment()
    bf16 = (
        "bf16 parameters and inputs (no autocast, no fp32 master weights)"
        if args.bf16_mode == "params"
        else "fp32 parameters and inputs under torch.autocast(cpu, bf16)"
    )
    return {
        "benchmark": "moefold bench moe-layer: forward + backward of one layer, ep=1",
        "timing": f"median of {args.steps} timed steps after {args.warmup} warm-ups, rows "
        "interleaved step by step; ratio_vs_dense = dense step time / row step time",
        "workload": f"tokens {workload.num_tokens} (batch {workload.batch} x seq {workload.seq}), "
        f"hidden {workload.hidden}, expert ffn {workload.ffn_hidden} SwiGLU, "
        f"{workload.num_experts} experts, top-{workload.topk} softmax router; "
        f"dense ffn {workload.topk * workload.ffn_hidden}",
        "model_flops_per_step": f"moe {workload.moe_step_flops() / 1e9:.1f} GFLOP, dense "
        f"{workload.dense_step_flops() / 1e9:.1f} GFLOP (2*m*n*k per matmul, x3 for fwd+bwd; "
        "capacity drops not subtracted)",
        "bf16": bf16,
        "environment": f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}, "
        f"python {env['python']}",
        "peak": ", ".join(f"{name} {flops / 1e9:.1f} GFLOP/s" for name, flops in peaks.items())
        + f" (torch.matmul {args.peak_size}^3, best of 1 s before and 1 s after the rows)",
        **{f"note {name}": note for name, note in ROW_NOTES.items() if name in names},
    }


def _capacity_factor(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("capacity factor must be > 0 or 'none' (dropless)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moefold.bench.moe_layer", description=__doc__.splitlines()[0]
    )
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
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    parser.add_argument(
        "--capacity-factor",
        nargs="+",
        type=_capacity_factor,
        default=[None],
        metavar="CF",
        help="one moefold row per value; 'none' = dropless",
    )
    parser.add_argument(
        "--hf-experts",
        nargs="+",
        default=["eager"],
        choices=["eager", "grouped_mm", "batched_mm"],
        help="transformers experts implementations to time",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the peak matmul")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("tokens", "batch", "hidden", "ffn", "experts", "topk", "steps", "peak_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
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
    peaks, rows = {}, []
    # Third-party builders print progress to stdout; keep stdout for the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        for dtype_name in dict.fromkeys(args.dtype):
            peaks[dtype_name], dtype_rows = run_dtype(args, workload, dtype_name)
            rows.extend(dtype_rows)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the DeepSpeed row's world-size-1 group
    info = header(args, workload, peaks, {row["name"] for row in rows})
    timing.print_report(info, rows, COLUMNS, args.json, peak_flops=peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
