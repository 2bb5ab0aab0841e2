"""Command line: argv -> JobConfig -> process group -> ParallelGroups -> model -> Trainer.

The one module that reads argv and the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE,
TORCHELASTIC_RESTART_COUNT, torchrun's agent store address, XDG_CACHE_HOME); library code gets
them as arguments (train.launch.Launch). Sub-commands: train, generate, bench, convert, upcycle,
plan, dry-run, prune, report, tokenize (`moefold COMMAND --help`).
    moefold train --config tiny-moe [--set moe.topk=4 ...] [--out DIR] [--nproc N]
    torchrun --standalone --nproc-per-node 4 -m moefold train --config tiny-moe --set parallel.ep=4
    moefold generate --checkpoint DIR [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from moefold import run_dir
from moefold.config import ConfigError, check_job, load_job
from moefold.data.tokenize_command import add_tokenize_parser
from moefold.dryrun.command import add_dry_run_parser
from moefold.errors import CheckpointError, NonFiniteError, RunFolderError
from moefold.interop.commands import add_convert_parser, add_upcycle_parser
from moefold.parallel.layout import ParallelLayout
from moefold.plan.command import add_plan_parser
from moefold.prune.command import add_prune_parser
from moefold.report.command import add_report_parser


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny-moe", help="preset name or TOML path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefold", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    train = sub.add_parser("train", help="train a model", formatter_class=defaults)
    _add_job_arguments(train)
    train.add_argument(
        "--out",
        default=None,
        help="run folder; an existing one resumes from its newest checkpoint "
        "(default: a new runs/<config name>/<UTC timestamp>)",
    )
    train.add_argument("--nproc", type=int, default=1, help="launch N >= 1 local ranks (torchrun)")
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --nproc: restart all ranks up to K >= 0 times after a failure "
        "(torchrun elastic; 0 = never); the run resumes from its newest checkpoint",
    )
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench = sub.add_parser("bench", help="benchmarks that print figures (see moefold/bench)")
    bench.add_argument(
        "suite",
        choices=["moe-layer", "dispatch", "pipeline-bubble", "train"],
        help="which benchmark",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    gen = sub.add_parser("generate", help="sample text from a checkpoint", formatter_class=defaults)
    gen.add_argument("--checkpoint", required=True, help="checkpoint folder (step_*) or run folder")
    gen.add_argument("--prompt", default="The")
    gen.add_argument("--max-new-tokens", type=int, default=60, help="tokens to add (>= 1)")
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="softmax temperature (> 0), or 0 for greedy decoding (always the likeliest token)",
    )
    gen.add_argument(
        "--top-k", type=int, default=40, help="sample among the k likeliest tokens (0 = all)"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--kv-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep keys/values of past tokens (one token per step); --no-kv-cache recomputes",
    )
    add_convert_parser(sub)
    add_upcycle_parser(sub)
    add_plan_parser(sub)
    add_report_parser(sub)
    add_tokenize_parser(sub)
    add_prune_parser(sub)
    add_dry_run_parser(sub)
    return parser


# The errors a command reports in one line (no traceback): (kind, label, exit status).
FAILURES = (
    (ConfigError, "config error", 2),
    (CheckpointError, "checkpoint error", 2),
    (RunFolderError, "run folder error", 2),
    (NonFiniteError, "training stopped", 3),
)


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
            _check_generate_args(args)
            from moefold.generate import generate_from_checkpoint

            print(generate_from_checkpoint(args))
            return 0
        if args.command in ("convert", "upcycle", "plan", "prune", "report", "tokenize", "dry-run"):
            return args.run(args)
    except tuple(kind for kind, _, _ in FAILURES) as error:
        label, status = next((lab, st) for kind, lab, st in FAILURES if isinstance(error, kind))
        print(f"moefold: {label}: {error}", file=sys.stderr)
        return status
    return 1


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_train_args(args: argparse.Namespace) -> None:
    """Launcher flags, checked before the config is read or any process starts."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1 (local ranks to launch), got {args.nproc}")
    if args.max_restarts < 0:
        raise ConfigError(
            f"--max-restarts: must be >= 0 (0 = no restarts), got {args.max_restarts}"
        )


def _check_generate_args(args: argparse.Namespace) -> None:
    """Sampling flags, checked before the checkpoint is read."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(
            f"--temperature: must be a finite number >= 0 (0 = greedy), got {args.temperature}"
        )
    if args.top_k < 0:
        raise ConfigError(f"--top-k: must be >= 0 (0 = no top-k cut), got {args.top_k}")


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    _check_train_args(args)
    world_size = _launched_world_size() if "RANK" in os.environ else args.nproc
    job = load_job(args.config, args.overrides)
    try:
        ParallelLayout.from_config(job.parallel, world_size)  # the most precise layout messages
        check_job(job, world_size)  # every config error surfaces before a process group starts
    except ConfigError as error:
        raise ConfigError(_checked_suggestion(str(error), job, world_size)) from None
    if job.checkpoint.init_from:
        from moefold.checkpoint import resolve_init_checkpoint
        from moefold.config import job_to_dict

        sections = job_to_dict(job)
        resolve_init_checkpoint(job.checkpoint.init_from, sections["model"], sections["moe"])
    if args.out and _already_finished(Path(args.out), job):
        return 0
    if (args.nproc > 1 or args.max_restarts) and "RANK" not in os.environ:
        if not args.out:  # one folder for every rank and every restart
            argv = [*argv, "--out", str(run_dir.new_run_dir(args.config))]
        else:  # a folder in use stops here, before any rank starts
            from moefold.safe_io import RunLock

            RunLock(Path(args.out)).acquire().release()
        return _relaunch_with_torchrun(args.nproc, args.max_restarts, argv)
    if args.out:
        out_dir = Path(args.out)
    elif "RANK" in os.environ:
        agent_store = (
            (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            else None
        )
        out_dir = run_dir.torchrun_run_dir(args.config, agent_store, int(os.environ["RANK"]))
    else:
        out_dir = run_dir.new_run_dir(args.config)
    from moefold.train.launch import run_training

    run_training(job, out_dir, device_name=args.device, launch=_launch_from_env())
    return 0


def _launch_from_env():
    """torchrun's description of this worker (rank, attempt), or a single process."""
    from moefold.train.launch import Launch

    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    cache_dir = str(Path(xdg_cache) / "moefold") if xdg_cache else None
    if "RANK" not in os.environ:
        return Launch(cache_dir=cache_dir)
    return Launch(
        launched=True,
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        cache_dir=cache_dir,
    )


def _already_finished(out_dir: Path, job) -> bool:
    """True (and says so) when `out_dir`'s newest checkpoint already has train.steps steps."""
    if job.checkpoint.resume != "auto":
        return False
    root = run_dir.checkpoint_root(out_dir, job.checkpoint.dir)
    step = run_dir.finished_step(root)
    if step is None or step < job.train.steps:
        return False
    if os.environ.get("RANK", "0") == "0":
        print(
            f"moefold: {out_dir} already trained {step} steps (train.steps={job.train.steps}); "
            "nothing to do. Raise train.steps to continue it, or drop --out for a new run.",
            flush=True,
        )
    return True


_LAYOUT_FIELDS = ("tp", "cp", "pp", "ep", "etp")


def _checked_suggestion(message: str, job, world_size: int) -> str:
    """Replace a layout error's suggested values with ones that pass every other check too
    (e.g. never ep=3 for 8 experts): the neighbours of the given value, tried whole-job."""
    import dataclasses

    field = message.partition(":")[0].strip()
    section, _, name = field.partition(".")
    if section != "parallel" or name not in _LAYOUT_FIELDS:
        return message
    current = getattr(job.parallel, name)

    def error_with(value: int) -> str | None:
        parallel = dataclasses.replace(job.parallel, **{name: value})
        try:
            ParallelLayout.from_config(parallel, world_size)
            check_job(dataclasses.replace(job, parallel=parallel), world_size)
        except ConfigError as error:
            return str(error)
        return None

    errors = {v: error_with(v) for v in range(1, world_size + 1) if v != current}
    good = [v for v, error in errors.items() if error is None]
    below = [v for v in good if v < current][-1:]
    above = [v for v in good if v > current][:1]
    head = message.split("; use ")[0]
    if not below + above:
        nearest = min(errors, key=lambda v: abs(v - current), default=None)
        why = f" (with {name}={nearest}: {errors[nearest]})" if nearest else ""
        return f"{head}; no value of {name} passes every check at world size {world_size}{why}"
    tail = message.partition("; use ")[2]
    world_hint = tail.partition(", or ")[2] if ", or " in tail else ""
    options = " or ".join(f"{name}={v}" for v in below + above)
    return f"{head}; use {options}" + (f", or {world_hint}" if world_hint else "")


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
    # Restarts are done here, each with a fresh torchrun (a new rendezvous store). torchrun's
    # own --max-restarts works too since each attempt's store keys got their own prefix
    # (launch.init_distributed; decisions.md 2026-12-07), as a multi-node job restarts.
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
