"""The ep > 1 rows of `moefold bench moe-layer`: the same layer and tokens, split over ep gloo
ranks (forked, one thread each, `moefold.testing.dist.run_ranks`).

Rank r holds tokens [r*T/ep, (r+1)*T/ep) of the ep = 1 workload and experts [r*E/ep,
(r+1)*E/ep). Rows: `dense` (each rank runs the same-FLOP dense MLP on its own tokens, no
communication: the data-parallel roofline), `moefold` and `moefold-cf<x>` (all-to-all
dispatcher, moe/apply_ep; dropless and each --capacity-factor) and DeepSpeed's MoE with
ep_size = ep when it is installed. Every rank times its rows round-robin, all ranks starting
each step together (a barrier, untimed); a row's step time is the slowest rank's time of that
step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moefold.bench import moe_layer, peers, timing
from moefold.bench.workload import Workload, random_weights
from moefold.testing.dist import run_ranks

RANK_TIMEOUT_S = 3 * 3600  # a bf16 DeepSpeed row on a CPU without bf16 instructions is slow


@dataclass(frozen=True)
class EPSection:
    """One section at one ep size: what every rank builds and times."""

    section: moe_layer.Section  # its workload holds all ranks' tokens together
    ep: int
    param_dtype: torch.dtype
    autocast: bool
    steps: int
    warmup: int
    seed: int
    capacity_factors: tuple[float | None, ...]  # one moefold row each (None = dropless)

    @property
    def local_workload(self) -> Workload:
        workload = self.section.workload
        return dataclasses.replace(workload, batch=1, seq=workload.num_tokens // self.ep)


def _moefold_ep_layer(spec: EPSection, groups, capacity_factor: float | None):
    from moefold.parallel.expert_parallel import apply_ep

    weights = random_weights(spec.section.workload, spec.seed)
    layer = moe_layer.build_moefold(spec.local_workload, weights, capacity_factor)
    apply_ep(layer, groups)  # keeps this rank's experts, binds the all-to-all dispatcher
    return layer


def rank_candidates(spec: EPSection, groups) -> list[moe_layer.Candidate]:
    local = spec.local_workload
    weights = random_weights(spec.section.workload, spec.seed)
    rows = [
        moe_layer.Candidate(
            "dense", lambda: moe_layer.build_dense(local, spec.seed), local.dense_step_flops()
        )
    ]
    for cf in spec.capacity_factors:
        build = lambda cf=cf: _moefold_ep_layer(spec, groups, cf)  # noqa: E731
        rows.append(
            moe_layer.Candidate(moe_layer.moefold_row_name(cf), build, local.moe_step_flops())
        )
    if spec.section.with_peers and importlib.util.find_spec("deepspeed") is not None:
        build = lambda: peers.build_deepspeed(local, weights, spec.ep)  # noqa: E731
        rows.append(moe_layer.Candidate("deepspeed", build, local.moe_step_flops(), True))
    return rows


def rank_body(rank: int, world_size: int, spec: EPSection) -> dict:
    from moefold.parallel.layout import ParallelLayout
    from moefold.parallel.mesh import build_parallel_groups

    torch.use_deterministic_algorithms(False)  # run_ranks turns it on for tests
    quiet = contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext()
    with quiet, contextlib.redirect_stdout(io.StringIO()):  # third-party chatter
        groups = build_parallel_groups(ParallelLayout.build(world_size, ep=world_size))
        modules = moe_layer.build_modules(rank_candidates(spec, groups), spec.param_dtype)
        x_BSD, grad_by_dtype = moe_layer.step_inputs(
            spec.local_workload, spec.param_dtype, spec.seed + 1 + rank
        )
        autocast_dtype = torch.bfloat16 if spec.autocast else None
        steps = {
            name: moe_layer.make_step(module, x_BSD, grad_by_dtype, autocast_dtype)
            for name, (module, _) in modules.items()
        }
        seconds = timing.time_interleaved(steps, spec.steps, spec.warmup, align=dist.barrier)
    return {"seconds": seconds, "flops": {name: f for name, (_, f) in modules.items()}}


def run_section(args: argparse.Namespace, section: moe_layer.Section, ep: int) -> list[dict]:
    """The section's rows at `ep` (> 1), each step's time the slowest rank's."""
    param_dtype, autocast = moe_layer.param_dtype_of(args, section.dtype_name)
    spec = EPSection(
        section,
        ep,
        param_dtype,
        autocast,
        args.steps,
        args.warmup,
        args.seed,
        tuple(args.capacity_factor),
    )
    timing.progress(f"{section.dtype_name} {section.shape} ep{ep}: forking {ep} gloo ranks")
    results = run_ranks(rank_body, ep, spec, timeout=RANK_TIMEOUT_S)
    names = [name for name in results[0]["seconds"] if all(name in r["seconds"] for r in results)]
    seconds = {
        name: [max(step) for step in zip(*(r["seconds"][name] for r in results), strict=True)]
        for name in names
    }
    flops = {name: ep * results[0]["flops"][name] for name in names}
    return moe_layer.section_rows(seconds, flops, section, ep)
