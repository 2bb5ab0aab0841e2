"""Command line: argv -> JobConfig -> process group -> ParallelGroups -> model -> Trainer.

The only reader of argv and of the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK).
    moefold train --config tiny-moe [--set moe.topk=1 ...] [--out DIR] [--nproc N]
    torchrun --standalone --nproc-per-node 4 -m moefold train --config tiny-moe --set parallel.ep=4
    moefold generate --checkpoint DIR [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from moefold.config import ConfigError, check_job, load_job
from moefold.errors import CheckpointError
from moefold.interop.commands import add_convert_parser, add_upcycle_parser
from moefold.parallel.layout import ParallelLayout
from moefold.plan.command import add_plan_parser


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny-moe", help="preset name or TOML path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefold", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model")
    _add_job_arguments(train)
    train.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    train.add_argument("--nproc", type=int, default=1, help="launch N local ranks (torchrun)")
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --nproc: restart all ranks up to K times after a failure "
        "(torchrun elastic); the run resumes from its newest checkpoint",
    )
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench = sub.add_parser("bench", help="benchmarks that print figures (see moefold/bench)")
    bench.add_argument(
        "suite",
        choices=["moe-layer", "dispatch", "pipeline-bubble", "train"],
        help="which benchmark",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help="checkpoint folder (step_*) or run folder")
    gen.add_argument("--prompt", default="The")
    gen.add_argument("--max-new-tokens", type=int, default=60)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--seed", type=int, default=0)
    add_convert_parser(sub)
    add_upcycle_parser(sub)
    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, argv if argv is not None else sys.argv[1:])
        if args.command == "bench":
            import importlib

            module = importlib.import_module(f"moefold.bench.{args.suite.replace('-', '_')}")
            return module.main(args.bench_args)
        if args.command == "generate":
            from moefold.generate import generate_from_checkpoint

            print(generate_from_checkpoint(args))
            return 0
        if args.command in ("convert", "upcycle", "plan"):
            return args.run(args)
    except ConfigError as error:
        print(f"moefold: config error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"moefold: checkpoint error: {error}", file=sys.stderr)
        return 2
    return 1


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    world_size = _launched_world_size() if "RANK" in os.environ else args.nproc
    job = load_job(args.config, args.overrides)
    ParallelLayout.from_config(job.parallel, world_size)  # the most precise layout messages
    check_job(job, world_size)  # every config error surfaces before a process group starts
    if job.checkpoint.init_from:
        from moefold.checkpoint import resolve_init_checkpoint
        from moefold.config import job_to_dict

        sections = job_to_dict(job)
        resolve_init_checkpoint(job.checkpoint.init_from, sections["model"], sections["moe"])
    if (args.nproc > 1 or args.max_restarts) and "RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc, args.max_restarts, argv)
    out_dir = Path(args.out or Path("runs") / Path(args.config).stem)
    from moefold.train.launch import run_training

    run_training(job, out_dir, device_name=args.device)
    return 0


def _relaunch_with_torchrun(nproc: int, max_restarts: int, argv: list[str]) -> int:
    """`--nproc N [--max-restarts K]`: the same command under torchrun on this machine."""
    launcher_flags = ("--nproc", "--max-restarts")
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in launcher_flags:
            skip = True
            continue
        if item.startswith(tuple(f"{flag}=" for flag in launcher_flags)):
            continue
        rest.append(item)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "moefold",
        *rest,
    ]
    # Restarts are done here, each with a fresh torchrun (a new rendezvous store), rather than
    # with torchrun --max-restarts: with gloo on torch 2.13 the restarted workers read the dead
    # workers' addresses from the agent's store and fail in connectFullMesh (decisions.md).
    # Every attempt resumes from the newest intact checkpoint (checkpoint.resume=auto).
    for attempt in range(max_restarts + 1):
        code = subprocess.call(command)
        if code == 0:
            return 0
        if attempt < max_restarts:
            print(
                f"moefold: ranks failed (exit {code}); restart {attempt + 1} of {max_restarts}",
                file=sys.stderr,
                flush=True,
            )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
