"""Token dispatchers on gloo ranks: step time and bytes per token next to the analytical minimum.

    moefold bench dispatch [--ep 2 4 8] [--routing top2-of-8 top8-of-64]
        [--tokens 1024 --hidden 512 --active-ffn 1024] [--steps 5 --warmup 2] [--json]

One row per dispatcher (all-to-all, all-to-all with de-duplication, all-gather), ep size and
routing. Each (routing, ep) forks ep gloo ranks (one thread each,
`moefold.testing.dist.run_ranks`), every rank with its own tokens; each rank builds one layer
per dispatcher from the same weights and times two steps of each, all round-robin
(`timing.time_interleaved`), so a busy neighbour slows every dispatcher alike:
- `step_ms`: forward + backward of a whole MoE layer (router, dispatch, experts, combine), the
  source of tokens_per_s and tflops (model FLOPs of all ranks' tokens / step time);
- `dispatch_ms`: forward + backward of the dispatch path alone (dispatch, rows scaled by their
  probabilities in place of the experts, combine) with uniformly random top-k routing.
Times are the slowest rank's median. Bytes come from `CommStats` over one dispatch-path step
(every family, forward and backward, summed over ranks, per token). The analytical minimum is
what must move whatever the dispatcher: each token's hidden row to every distinct remote rank
holding one of its experts and back, forward and backward, `4 * D * 4 bytes * distinct remote
ranks`, counted from the actual routing. `saving` is the plain all-to-all's bytes over this
row's; `expected` is the factor uniform random routing predicts for de-duplication:
`K * (n - 1) / n` slot rows against `(n - 1) * (1 - C(E - e, K) / C(E, K))` distinct remote
ranks per token (K experts drawn without replacement, e = E / n per rank).

Shape legend: T tokens per rank, D model dim, F expert FFN hidden, E experts, K experts per
token, n ep size, R rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moefold.bench import bench_parser, timing
from moefold.bench.moe_layer import build_moefold, make_step
from moefold.bench.timing import Column
from moefold.bench.workload import Workload, random_weights
from moefold.testing.dist import run_ranks

ROUTINGS = {"top2-of-8": (8, 2), "top8-of-64": (64, 8)}  # name -> (E, K)
DISPATCHERS = {  # row name -> (moe.dispatcher, moe.dedup)
    "moefold-alltoall": ("alltoall", False),
    "moefold-alltoall-dedup": ("alltoall", True),
    "moefold-allgather": ("allgather", False),
}
FP32_BYTES = 4
NAME, *OTHER_ROW_COLUMNS = timing.ROW_COLUMNS
COLUMNS = (
    NAME,
    Column("routing", "routing"),
    *OTHER_ROW_COLUMNS,
    Column("step_ms", "step_ms", ".1f"),
    Column("dispatch_ms", "dispatch_ms", ".2f"),
    Column("bytes_per_token", "bytes_per_token", ".0f"),
    Column("min_bytes_per_token", "min_bytes_per_token", ".0f"),
    Column("bytes_vs_min", "bytes_vs_min", ".3f"),
    Column("saving", "saving", ".3f"),
    Column("expected", "expected", ".3f"),
)


@dataclass(frozen=True)
class GroupSpec:
    """Rows measured in one set of ranks: dispatchers at one ep size on one workload."""

    names: tuple[str, ...]
    routing: str
    ep: int
    workload: Workload
    steps: int
    warmup: int
    seed: int


def expected_distinct_remote(num_experts: int, topk: int, ep: int) -> float:
    """Mean distinct remote ranks per token, K experts uniformly without replacement."""
    e = num_experts // ep
    miss = math.comb(num_experts - e, topk) / math.comb(num_experts, topk)
    return (ep - 1) * (1.0 - miss)


def expected_dedup_saving(num_experts: int, topk: int, ep: int) -> float:
    """Plain all-to-all rows over de-duplicated rows per token (uniform random routing)."""
    return topk * (ep - 1) / ep / expected_distinct_remote(num_experts, topk, ep)


def uniform_routing(workload: Workload, generator: torch.Generator):
    """probs [T, K] (a leaf that wants a gradient) and expert ids [T, K], distinct per token."""
    T, E, K = workload.num_tokens, workload.num_experts, workload.topk
    ids_TK = torch.rand(T, E, generator=generator).topk(K, dim=1).indices
    probs_TK = torch.rand(T, K, generator=generator).softmax(-1).requires_grad_()
    return probs_TK, ids_TK


def dispatch_step(dispatcher, x_TD, probs_TK, ids_TK, grad_TD):
    """Forward + backward of dispatch -> rows scaled by probability -> combine."""

    def step() -> None:
        x_TD.grad, probs_TK.grad = None, None
        rows_RD, probs_R, _, plan = dispatcher.dispatch(x_TD, probs_TK, ids_TK)
        out_TD = dispatcher.combine(rows_RD * probs_R.unsqueeze(-1), plan)
        out_TD.backward(grad_TD)

    return step


def distinct_remote_ranks(ids_TK: torch.Tensor, experts_per_rank: int, rank: int, n: int) -> int:
    """Sum over tokens of the remote ranks holding at least one of the token's experts."""
    hits_Tn = torch.zeros(ids_TK.shape[0], n, dtype=torch.bool)
    hits_Tn.scatter_(1, ids_TK // experts_per_rank, True)
    hits_Tn[:, rank] = False
    return int(hits_Tn.sum())


def build_layer(name: str, workload: Workload, seed: int, groups):
    """The benchmark's MoE layer (moe_layer.build_moefold) with dispatcher `name` bound."""
    from moefold.parallel.expert_parallel import apply_ep

    layer = build_moefold(workload, random_weights(workload, seed), None)
    dispatcher, dedup = DISPATCHERS[name]
    layer.cfg = dataclasses.replace(layer.cfg, dispatcher=dispatcher, dedup=dedup)
    apply_ep(layer, groups)
    return layer.train()


def rank_body(rank: int, world_size: int, spec: GroupSpec) -> dict:
    from moefold.parallel.layout import ParallelLayout
    from moefold.parallel.mesh import build_parallel_groups

    torch.use_deterministic_algorithms(False)  # run_ranks turns it on for tests
    quiet = contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext()
    with quiet:
        workload = spec.workload
        groups = build_parallel_groups(ParallelLayout.build(world_size, ep=world_size))
        generator = torch.Generator().manual_seed(spec.seed + 1 + rank)
        shape = (workload.batch, workload.seq, workload.hidden)
        x_BSD = torch.randn(shape, generator=generator).requires_grad_()
        grad_BSD = torch.randn(shape, generator=generator)
        x_TD = torch.randn(workload.num_tokens, workload.hidden, generator=generator)
        x_TD.requires_grad_()
        probs_TK, ids_TK = uniform_routing(workload, generator)
        steps, sent_bytes = {}, {}
        for name in spec.names:
            layer = build_layer(name, workload, spec.seed, groups)
            steps[f"{name} layer"] = make_step(layer, x_BSD, {torch.float32: grad_BSD}, None)
            dispatch = dispatch_step(
                layer.dispatcher, x_TD, probs_TK, ids_TK, grad_BSD.view_as(x_TD)
            )
            steps[f"{name} dispatch"] = dispatch
            groups.comm_stats.reset()
            dispatch()
            sent_bytes[name] = sum(groups.comm_stats.as_dict().values())
        seconds = timing.time_interleaved(steps, spec.steps, spec.warmup, align=dist.barrier)
    experts_per_rank = workload.num_experts // world_size
    return {
        "seconds": {key: timing.median(values) for key, values in seconds.items()},
        "sent_bytes": sent_bytes,
        "distinct_remote": distinct_remote_ranks(ids_TK, experts_per_rank, rank, world_size),
    }


def run_group(spec: GroupSpec) -> list[dict]:
    """One row per dispatcher of `spec`, all timed in the same ranks, step by step."""
    timing.progress(f"{spec.routing} ep{spec.ep}: {', '.join(spec.names)}")
    results = run_ranks(rank_body, spec.ep, spec, timeout=900)
    workload = spec.workload
    num_tokens = spec.ep * workload.num_tokens
    distinct = sum(r["distinct_remote"] for r in results) / num_tokens
    min_bytes = 4 * workload.hidden * FP32_BYTES * distinct
    rows = []
    for name in spec.names:
        layer_s = max(r["seconds"][f"{name} layer"] for r in results)
        dispatch_s = max(r["seconds"][f"{name} dispatch"] for r in results)
        bytes_per_token = sum(r["sent_bytes"][name] for r in results) / num_tokens
        rows.append(
            {
                "name": name,
                "routing": spec.routing,
                "dtype": "fp32",
                "ep": spec.ep,
                "tokens_per_s": num_tokens / layer_s,
                "tflops": spec.ep * workload.moe_step_flops() / layer_s / 1e12,
                "step_ms": 1e3 * layer_s,
                "dispatch_ms": 1e3 * dispatch_s,
                "bytes_per_token": bytes_per_token,
                "min_bytes_per_token": min_bytes,
                "bytes_vs_min": bytes_per_token / min_bytes if min_bytes else None,
                "distinct_remote_per_token": distinct,
            }
        )
    return rows


def add_savings(rows: list[dict]) -> None:
    """`saving` = plain all-to-all bytes / this row's bytes, same routing and ep."""
    plain = {
        (row["routing"], row["ep"]): row["bytes_per_token"]
        for row in rows
        if row["name"] == "moefold-alltoall"
    }
    for row in rows:
        key = (row["routing"], row["ep"])
        row["saving"] = plain[key] / row["bytes_per_token"] if key in plain else None
        num_experts, topk = ROUTINGS[row["routing"]]
        dedup = row["name"] == "moefold-alltoall-dedup"
        row["expected"] = expected_dedup_saving(num_experts, topk, row["ep"]) if dedup else None


def header(args: argparse.Namespace) -> dict:
    env = timing.environment()
    routings = ", ".join(
        f"{name}: E={ROUTINGS[name][0]} K={ROUTINGS[name][1]} "
        f"F={args.active_ffn // ROUTINGS[name][1]}"
        for name in args.routing
    )
    return {
        "benchmark": "moefold bench dispatch: dispatchers on gloo, forward + backward",
        "timing": f"slowest rank's median of {args.steps} timed steps after {args.warmup} "
        "warm-ups; step = MoE layer, dispatch = dispatch path alone (module doc)",
        "workload": f"{args.tokens} tokens per rank (batch {args.batch}), hidden {args.hidden}, "
        f"fp32; {routings} (F = active ffn {args.active_ffn} / K)",
        "bytes": "sent by all ranks per token, every family, fwd + bwd; min = 4 * D * 4 * "
        "distinct remote ranks per token; saving = plain alltoall / row; expected = uniform "
        "random routing's dedup factor",
        "environment": f"torch {env['torch']}, 1 thread per rank, ranks share "
        f"{os.cpu_count()} cores, {env['cpu']}, python {env['python']}",
        "host memory": args.host_memory,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("dispatch", __doc__)
    parser.add_argument("--ep", nargs="+", type=int, default=[2, 4, 8], help="ep sizes")
    parser.add_argument("--routing", nargs="+", choices=list(ROUTINGS), default=list(ROUTINGS))
    parser.add_argument(
        "--dispatcher",
        nargs="+",
        choices=list(DISPATCHERS),
        default=list(DISPATCHERS),
        help="rows; 'saving' needs moefold-alltoall among them",
    )
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank (batch*seq)")
    parser.add_argument("--batch", type=int, default=2, help="sequences the tokens form")
    parser.add_argument("--hidden", type=int, default=512, help="model dim D")
    parser.add_argument(
        "--active-ffn", type=int, default=1024, help="K * F: each routing's expert FFN is this / K"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    timing.add_host_memory_flag(parser)
    return parser


def group_specs(args: argparse.Namespace) -> list[GroupSpec]:
    specs = []
    names = tuple(dict.fromkeys(args.dispatcher))
    for routing in args.routing:
        num_experts, topk = ROUTINGS[routing]
        workload = Workload(
            batch=args.batch,
            seq=args.tokens // args.batch,
            hidden=args.hidden,
            ffn_hidden=args.active_ffn // topk,
            num_experts=num_experts,
            topk=topk,
        )
        for ep in args.ep:
            specs.append(
                GroupSpec(names, routing, ep, workload, args.steps, args.warmup, args.seed)
            )
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("tokens", "batch", "hidden", "active_ffn", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.tokens % args.batch:
        parser.error(f"--tokens {args.tokens} is not divisible by --batch {args.batch}")
    for routing in args.routing:
        num_experts, topk = ROUTINGS[routing]
        if args.active_ffn % topk:
            parser.error(f"--active-ffn {args.active_ffn} is not divisible by K={topk}")
        bad = [ep for ep in args.ep if ep < 2 or num_experts % ep]
        if bad:
            parser.error(f"--ep {bad}: each ep must be >= 2 and divide E={num_experts}")
    args.host_memory = timing.apply_host_memory(args)
    rows = [row for spec in group_specs(args) for row in run_group(spec)]
    add_savings(rows)
    info = header(args)
    timing.print_report(info, rows, COLUMNS, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
