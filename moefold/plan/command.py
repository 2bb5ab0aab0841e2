"""`moefold plan`: the sub-command's arguments, and its output as a table or as JSON.

    moefold plan --model mixtral-8x22b --gpus 128 --gpu h100 --capacity-factor 1 --top 5
    moefold plan --model tiny-moe --gpus 2 --gpu cpu --json

The JSON document (schema "moefold.plan/1") is described field by field in docs/planner.md;
its keys and their order do not change within a schema version.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch

from moefold.config import ConfigError, load_job
from moefold.plan.cost import FAMILIES, Candidate, Estimate, Workload, moefold_workload
from moefold.plan.hardware import GIB, Device, device_names, get_device
from moefold.plan.memory import MEMORY_KINDS
from moefold.plan.search import Plan, estimate_candidate, plan

SCHEMA = "moefold.plan/1"
TIME_KEYS = ("compute", *FAMILIES, "bubble", "optimizer", "total")


def add_plan_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plan` on the CLI's sub-parsers."""
    parser = sub.add_parser("plan", help="rank parallel layouts by predicted step time")
    parser.add_argument("--model", required=True, help="preset name or TOML path")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a field of the model config",
    )
    parser.add_argument("--gpus", type=int, required=True, help="number of devices (ranks)")
    parser.add_argument(
        "--gpu",
        default="h100",
        choices=device_names(),
        help="device; 'cpu' measures this machine once (cached)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence, >= 1 (default: the config's)",
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per step, >= 1 (default: the config's)",
    )
    parser.add_argument(
        "--nodes-of",
        type=int,
        default=None,
        help="devices per node (default: 8 for GPUs, 72 for gb200, --gpus on cpu)",
    )
    parser.add_argument(
        "--fold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-fold keeps the pre-folding rules (etp = tp, ep within dp)",
    )
    drop = parser.add_mutually_exclusive_group()
    drop.add_argument("--dropless", action="store_true", help="no capacity (default: config)")
    drop.add_argument("--capacity-factor", type=float, default=None, metavar="CF")
    parser.add_argument("--top", type=int, default=10, help="layouts to print")
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    parser.set_defaults(run=run_plan)
    return parser


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The Workload of the CLI arguments (config + overrides + step shape + capacity)."""
    job = load_job(args.model, args.overrides)
    moe = job.moe
    if args.dropless:
        moe = dataclasses.replace(moe, capacity_factor=None, pad_to_capacity=False)
    elif args.capacity_factor is not None:
        if args.capacity_factor <= 0:
            raise ConfigError("--capacity-factor: must be > 0; use --dropless for no capacity")
        moe = dataclasses.replace(moe, capacity_factor=args.capacity_factor)
    # An explicit 0 is a mistake to report, never "use the config's value".
    for flag, value in (("--seq-len", args.seq_len), ("--global-batch", args.global_batch)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}; leave it out for the config's")
    seq_len = job.train.seq_len if args.seq_len is None else args.seq_len
    global_batch = job.train.global_batch if args.global_batch is None else args.global_batch
    return moefold_workload(
        job.model, moe, seq_len, global_batch, job.train.dtype, job.parallel.grad_compression
    )


def run_plan(args: argparse.Namespace) -> int:
    """Run the planner for parsed `plan` arguments; prints a table or JSON. Returns 0."""
    if args.gpus < 1:
        raise ConfigError("--gpus: must be >= 1")
    if args.top < 1:
        raise ConfigError("--top: must be >= 1")
    if args.nodes_of is not None and args.nodes_of < 1:  # not "use the default"
        raise ConfigError(
            f"--nodes-of: must be >= 1, got {args.nodes_of}; leave it out for the default"
        )
    w = workload_from_args(args)
    dtype = torch.bfloat16 if w.dtype == "bf16" else torch.float32
    nodes_of = args.nodes_of
    if args.gpu == "cpu":
        nodes_of = nodes_of or args.gpus
        device = get_device("cpu", dtype, ranks_per_node=min(nodes_of, args.gpus))
    else:
        device = get_device(args.gpu, dtype)
        nodes_of = nodes_of or device.gpus_per_node
    if nodes_of < 1:
        raise ConfigError("--nodes-of: must be >= 1")
    result = plan(w, args.gpus, device, nodes_of=nodes_of, fold=args.fold, top=args.top)
    baseline = None
    if args.fold:  # what folding buys: the best layout under the pre-folding rules
        pre = plan(w, args.gpus, device, nodes_of=nodes_of, fold=False, top=1)
        baseline = pre.ranked[0] if pre.ranked else None
    query = {
        "model": args.model,
        "overrides": list(args.overrides),
        "gpus": args.gpus,
        "gpu": args.gpu,
        "nodes_of": nodes_of,
        "seq_len": w.seq_len,
        "global_batch": w.global_batch,
        "fold": args.fold,
        "capacity_factor": w.moe.capacity_factor,
        "dtype": w.dtype,
        "top": args.top,
    }
    document = to_document(query, device, result, baseline)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        print()
    else:
        print(format_table(document))
        if w.grad_compression == "bytegrad" and result.ranked:
            print(bytegrad_note(w, args.gpus, device, result.ranked[0], nodes_of))
    return 0


def bytegrad_note(w: Workload, gpus: int, device: Device, e: Estimate, nodes_of: int) -> str:
    """Whether ByteGrad pays on layout `e`: its dp + edp bytes and exposed seconds against the
    same layout reducing in full precision (quantise cost included)."""
    uncompressed = dataclasses.replace(w, grad_compression="none")
    full = estimate_candidate(uncompressed, gpus, device, e.candidate, nodes_of=nodes_of)
    seconds = [x.time["dp"] + x.time["edp"] for x in (e, full)]
    mib = [(x.comm_bytes["dp"] + x.comm_bytes["edp"]) / 2**20 for x in (e, full)]
    verdict = "it pays" if seconds[0] < seconds[1] else "it does not pay"
    if max(seconds) < 1e-6:
        verdict = "nothing to gain: the reductions hide behind compute either way"
    return (
        f"grad_compression=bytegrad on the first layout: dp+edp {mib[0]:.1f} MiB and "
        f"{seconds[0] * 1e3:.2f} ms exposed per step (quantising included) vs {mib[1]:.1f} MiB "
        f"and {seconds[1] * 1e3:.2f} ms in full precision: {verdict}"
    )


# ---- output ------------------------------------------------------------------------------------


def overrides_for(c: Candidate) -> list[str]:
    """The `--set` arguments that train this layout with `moefold train`."""
    out = [f"parallel.{name}={getattr(c, name)}" for name in ("tp", "cp", "pp", "ep", "etp")]
    if c.vpp > 1:
        out += [f"parallel.vpp={c.vpp}", "parallel.pp_schedule=interleaved_1f1b"]
    out += [f"train.micro_batch={c.micro_batch}"]
    if c.distributed_optimizer:
        out += ["parallel.distributed_optimizer=true"]
    if c.recompute:
        out += ["train.recompute=full"]
    return out


def launch_command(document: dict) -> str:
    """The torchrun command that trains the first layout as planned: world size, nodes and
    processes per node, the plan's model overrides, step shape and capacity, and the layout.

    One node: --standalone. Several: a c10d rendezvous at $MASTER_ADDR:29500 (docs/cluster.md);
    the same command runs on every node."""
    q = document["query"]
    gpus, per_node = q["gpus"], min(q["nodes_of"], q["gpus"])
    if gpus % per_node:
        per_node = next(n for n in range(per_node, 0, -1) if gpus % n == 0)
    nodes = gpus // per_node
    if nodes == 1:
        launcher = f"torchrun --standalone --nproc-per-node {per_node}"
    else:
        launcher = (
            f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
            "--rdzv-endpoint $MASTER_ADDR:29500 --rdzv-id $RUN_ID"
        )
    cf = q["capacity_factor"]
    sets = [
        *q["overrides"],
        f"train.seq_len={q['seq_len']}",
        f"train.global_batch={q['global_batch']}",
        f"moe.capacity_factor={'none' if cf is None else cf}",
        *(["moe.pad_to_capacity=false"] if cf is None else []),
        *document["layouts"][0]["set"],
    ]
    return f"{launcher} -m moefold train --config {q['model']} " + " ".join(
        f"--set {s}" for s in sets
    )


def layout_entry(rank: int, e: Estimate) -> dict[str, Any]:
    """One ranked layout as a JSON-ready dict (keys in a fixed order)."""
    c = e.candidate
    entry: dict[str, Any] = {"rank": rank}
    for name in ("tp", "cp", "pp", "vpp", "dp", "etp", "ep", "edp", "micro_batch"):
        entry[name] = getattr(c, name)
    entry.update(
        recompute=c.recompute, distributed_optimizer=c.distributed_optimizer, folded=c.folded
    )
    entry["memory_gib"] = {k: round(e.memory[k] / GIB, 3) for k in (*MEMORY_KINDS, "total")}
    entry["time_s"] = {k: round(e.time[k], 5) for k in TIME_KEYS}
    entry["comm_bytes"] = {k: int(e.comm_bytes.get(k, 0)) for k in FAMILIES}
    entry["tokens_per_s"] = round(e.tokens_per_s, 1)
    entry["mfu"] = round(e.mfu, 4)
    entry["set"] = overrides_for(c)
    return entry


def to_document(query: dict, device: Device, result: Plan, baseline: Estimate | None) -> dict:
    """The full JSON document (schema SCHEMA)."""
    return {
        "schema": SCHEMA,
        "query": query,
        "device": {
            "name": device.name,
            "peak_tflops": round(device.peak_flops / 1e12, 2),
            "memory_gib": round(device.memory_bytes / GIB, 2),
            "intra_node_gbps": round(device.intra_node_bandwidth / 1e9, 2),
            "inter_node_gbps": round(device.inter_node_bandwidth / 1e9, 2),
            "source": device.source,
        },
        "counts": {
            "candidates": result.num_candidates,
            "evaluated": result.num_evaluated,
            "fitting": result.num_fitting,
        },
        "layouts": [layout_entry(i + 1, e) for i, e in enumerate(result.ranked)],
        "without_folding": layout_entry(1, baseline) if baseline else None,
    }


_HEADER = (
    f"{'#':>3} {'tp':>2} {'cp':>2} {'pp':>2} {'vpp':>3} {'dp':>4} | {'etp':>3} {'ep':>3} "
    f"{'edp':>4} | {'mb':>2} rc do | {'wts':>5} {'grad':>5} {'opt':>5} {'act':>5} {'disp':>4} "
    f"{'tot':>5} | {'step':>6} {'comp':>6} {'tp':>5} {'cp':>5} {'ep':>5} {'etp':>5} {'pp':>5} "
    f"{'dp':>5} {'edp':>5} {'bub':>5} | {'tok/s':>9} {'MFU':>5}"
)


def _row(entry: dict) -> str:
    m, t = entry["memory_gib"], entry["time_s"]
    recompute = "y" if entry["recompute"] else "n"
    sharded = "y" if entry["distributed_optimizer"] else "n"
    flags = f"{recompute:>2} {sharded:>2}"
    return (
        f"{entry['rank']:>3} {entry['tp']:>2} {entry['cp']:>2} {entry['pp']:>2} "
        f"{entry['vpp']:>3} {entry['dp']:>4} | {entry['etp']:>3} {entry['ep']:>3} "
        f"{entry['edp']:>4} | {entry['micro_batch']:>2} {flags} | {m['weights']:>5.1f} "
        f"{m['gradients']:>5.1f} {m['optimizer']:>5.1f} {m['activations']:>5.1f} "
        f"{m['dispatcher']:>4.1f} {m['total']:>5.1f} | {t['total']:>6.3f} {t['compute']:>6.3f} "
        + " ".join(f"{t[k]:>5.3f}" for k in ("tp", "cp", "ep", "etp", "pp", "dp", "edp"))
        + f" {t['bubble']:>5.3f} | {entry['tokens_per_s']:>9.0f} {entry['mfu'] * 100:>4.1f}%"
    )


def format_table(document: dict) -> str:
    """The human-readable report: query, device, the ranked table and the pre-folding best."""
    q, d, n = document["query"], document["device"], document["counts"]
    cf = "dropless" if q["capacity_factor"] is None else f"capacity factor {q['capacity_factor']}"
    lines = [
        f"moefold plan: {q['model']} on {q['gpus']} x {d['name']} ({q['nodes_of']} per node), "
        f"seq {q['seq_len']}, global batch {q['global_batch']}, {cf}, {q['dtype']}, "
        f"{'folded' if q['fold'] else 'pre-folding rules'}",
        f"device: {d['peak_tflops']} TFLOP/s peak, {d['memory_gib']} GiB, "
        f"{d['intra_node_gbps']} GB/s in node, {d['inter_node_gbps']} GB/s across nodes",
        f"{n['candidates']} legal candidates, {n['evaluated']} estimated (dominated knobs "
        f"skipped), {n['fitting']} fit in memory",
        "memory in GiB per device; step split in seconds: compute, exposed communication per "
        "dimension, pipeline bubble (optimizer step not shown)",
        _HEADER,
    ]
    lines += [_row(entry) for entry in document["layouts"]]
    if not document["layouts"]:
        lines.append("  (no layout fits in memory: add devices or shorten the sequence)")
    if document["without_folding"]:
        lines += [
            "best layout under the pre-folding rules (--no-fold):",
            _row(document["without_folding"]),
        ]
    if document["layouts"]:
        lines.append("train the first with (docs/cluster.md for several nodes):")
        lines.append("  " + launch_command(document))
    return "\n".join(lines)
