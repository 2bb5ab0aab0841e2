"""`moefold dry-run`: rank r of an N-rank job, one optimizer step on fake tensors.

    moefold dry-run --config mixtral-8x22b --world-size 128 --set parallel.tp=2 ... [--json]
Rows per rank: parameter count, bytes of parameters, gradients, optimizer state and peak
activations, bytes sent per communication family, and the planner's bytes beside them.
The config is checked exactly as `moefold train` checks it, before anything is built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from moefold.config import ConfigError, check_job, load_job
from moefold.dryrun.planner import PlannerFigures
from moefold.dryrun.routing import RoutingOverride, parse_routing
from moefold.dryrun.shards import distinct_shard_total, parse_ranks
from moefold.model.size import count_parameters
from moefold.parallel.layout import ParallelLayout
from moefold.plan.hardware import device_names

MEMORY_KEYS = ("params", "grads", "optimizer", "activations_peak", "total")


def add_dry_run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `dry-run` on the CLI's sub-parsers."""
    parser = sub.add_parser(
        "dry-run",
        help="one training step of rank r of an N-rank job on fake tensors: memory and traffic",
    )
    parser.add_argument("--config", default="tiny-moe", help="preset name or TOML path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE"
    )
    parser.add_argument("--world-size", type=int, required=True, help="ranks of the job, >= 1")
    parser.add_argument(
        "--ranks",
        default=None,
        help="'all', or comma-separated ranks (default: the first rank of every pipeline "
        "stage; ranks of one stage hold equal-sized shards)",
    )
    parser.add_argument(
        "--routing",
        default="balanced",
        help="'balanced', or 'skewed:F' = share F of every rank's token-slots on one expert",
    )
    parser.add_argument(
        "--gpu", default="h100", choices=device_names(), help="device of the planner figures"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    parser.set_defaults(run=run_dry_run)
    return parser


def check_dry_run(job, world_size: int) -> None:
    """The checks of `moefold train` (layout, then the cross-section rules), plus what the
    dry run itself cannot run."""
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    ParallelLayout.from_config(job.parallel, world_size)
    check_job(job, world_size)
    if job.moe.enabled and job.parallel.ep * job.parallel.etp > 1:
        if job.moe.dispatcher != "alltoall" or job.moe.dedup:
            raise ConfigError(
                f"moe.dispatcher: the dry run runs the all-to-all dispatcher (got "
                f"{job.moe.dispatcher!r}, dedup={job.moe.dedup}); use moe.dispatcher=alltoall "
                "and moe.dedup=false"
            )


def dry_run_document(args: argparse.Namespace) -> dict:
    from moefold.dryrun.step import run_rank  # imports the trainer: after the checks

    job = load_job(args.config, args.overrides)
    check_dry_run(job, args.world_size)
    skew = parse_routing(args.routing)
    ranks = parse_ranks(args.ranks, job, args.world_size)
    planner = PlannerFigures(job, args.world_size, args.gpu)
    routing = RoutingOverride(skew)
    rows = []
    for rank in ranks:
        started = time.perf_counter()
        result = run_rank(job, args.world_size, rank, routing)
        rows.append(
            {
                "rank": rank,
                "pp_rank": result.pp_rank,
                "param_count": result.param_count,
                "memory_bytes": result.memory_bytes,
                "comm_bytes": {k: v for k, v in result.comm_bytes.items() if v},
                "plan_memory_bytes": planner.memory(result.pp_rank),
                "plan_comm_bytes": planner.comm(result.pp_rank),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        if not args.json:
            print(f"moefold dry-run: rank {rank} done", file=sys.stderr, flush=True)
    num_shards, shard_total = distinct_shard_total(job, args.world_size)
    return {
        "config": args.config,
        "overrides": list(args.overrides),
        "world_size": args.world_size,
        "routing": args.routing,
        "model_params": count_parameters(job.model, job.moe).total,
        "distinct_shards": {"slices": num_shards, "params": shard_total},
        "ranks": rows,
    }


def _gib(value: float) -> str:
    return f"{value / 2**30:8.2f}"


def format_table(doc: dict) -> str:
    lines = [
        f"{doc['config']} on {doc['world_size']} ranks ({doc['routing']} routing); GiB, "
        "dry run / planner",
        f"{'rank':>5} {'pp':>3} {'params':>14} " + " ".join(f"{key:>19}" for key in MEMORY_KEYS),
    ]
    for row in doc["ranks"]:
        mem, plan = row["memory_bytes"], row["plan_memory_bytes"]
        cells = " ".join(f"{_gib(mem[k])} /{_gib(plan[k])}" for k in MEMORY_KEYS)
        lines.append(f"{row['rank']:>5} {row['pp_rank']:>3} {row['param_count']:>14,} {cells}")
    lines.append("")
    lines.append("bytes sent per step (GiB), dry run / planner:")
    for row in doc["ranks"]:
        sent, plan = row["comm_bytes"], row["plan_comm_bytes"]
        families = dict.fromkeys([*sent, *plan])  # CommStats' order, then the planner's
        comm = ", ".join(
            f"{f} {_gib(sent.get(f, 0)).strip()} / {_gib(plan.get(f, 0)).strip()}" for f in families
        )
        lines.append(f"  rank {row['rank']}: {comm}")
    shards = doc["distinct_shards"]
    same = "equal" if shards["params"] == doc["model_params"] else "DIFFERENT"
    lines.append(
        f"distinct shards: {shards['slices']} slices, {shards['params']:,} parameters; model "
        f"{doc['model_params']:,} ({same})"
    )
    return "\n".join(lines)


def run_dry_run(args: argparse.Namespace) -> int:
    doc = dry_run_document(args)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(format_table(doc))
    return 0
