"""Pipeline bubble: measured idle time per rank next to the formula (pp - 1) / (m * v).

    moefold bench pipeline-bubble [--layers 8] [--microbatches 8] [--steps 4]

Each rank runs real training steps of a tiny-moe-shaped model on gloo. A rank's busy time is
its process CPU time (one thread per rank; gloo waits block rather than spin), its idle time
is wall time minus busy time. The table reports idle / busy per step, which the bubble formula
predicts as (pp - 1) / (m * v) for 1F1B (v = 1) and interleaved 1F1B (v virtual stages).
With more ranks than cores (pp4 on a 2-core machine) ranks also wait for a core, so idle time
is over-counted there; the pp2 rows are the clean measurement.
"""

from __future__ import annotations

import time

import torch

from moefold.bench import bench_parser
from moefold.config import load_job
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from moefold.testing.reference import build_test_trainer

LAYOUTS = [(2, 1, "1f1b"), (2, 2, "interleaved_1f1b"), (4, 1, "1f1b"), (4, 2, "interleaved_1f1b")]


def _rank_body(rank, world_size, overrides, steps):
    job = load_job("tiny-moe", overrides)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    trainer = build_test_trainer(job, groups)
    trainer.train_step()  # warm-up
    wall, busy = 0.0, 0.0
    for _ in range(steps):
        groups.barrier()
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train_step()
        wall += time.perf_counter() - wall_start
        busy += time.process_time() - cpu_start
    return wall / steps, busy / steps


def measure(
    pp: int, vpp: int, schedule: str, layers: int, microbatches: int, steps: int, micro_batch: int
):
    overrides = [
        f"model.layers={layers}",
        f"parallel.pp={pp}",
        f"parallel.vpp={vpp}",
        f"parallel.pp_schedule={schedule}",
        "data.source=synthetic",
        f"train.micro_batch={micro_batch}",
        f"train.global_batch={microbatches * micro_batch}",
        "train.eval_batches=1",
        "checkpoint.every=0",
    ]
    per_rank = run_ranks(_rank_body, pp, overrides, steps, timeout=600)
    idle_ratio = sum((wall - busy) / busy for wall, busy in per_rank) / len(per_rank)
    step_s = max(wall for wall, _ in per_rank)
    return {
        "pp": pp,
        "vpp": vpp,
        "schedule": schedule,
        "microbatches": microbatches,
        "formula": (pp - 1) / (microbatches * vpp),
        "measured": idle_ratio,
        "step_s": step_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("pipeline-bubble", __doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"# torch {torch.__version__}, 1 thread per rank, tiny-moe shape, "
        f"{args.layers} layers, m={args.microbatches} micro-batches of "
        f"{args.micro_batch} x 128 tokens"
    )
    print("| pp | vpp | schedule | formula (pp-1)/(m*v) | measured idle/busy | step s |")
    print("|---|---|---|---|---|---|")
    for pp, vpp, schedule in LAYOUTS:
        row = measure(
            pp, vpp, schedule, args.layers, args.microbatches, args.steps, args.micro_batch
        )
        print(
            f"| {pp} | {vpp} | {schedule} | {row['formula']:.3f} | {row['measured']:.3f} "
            f"| {row['step_s']:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
