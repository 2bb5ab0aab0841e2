"""`moefold plan` prints a torchrun command that launches as printed: torchrun's own parser
takes it, the world size is nodes x processes, and the moefold arguments pass every check."""

from __future__ import annotations

import shlex

import pytest
from torch.distributed.run import get_args_parser

from moefold.cli import build_parser, main
from moefold.config import check_job, load_job
from moefold.parallel.layout import ParallelLayout


def _printed_command(capsys, argv: list[str]) -> list[str]:
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("train the first with"))
    return shlex.split(lines[index + 1].replace("$MASTER_ADDR", "node0").replace("$RUN_ID", "7"))


@pytest.mark.parametrize(
    ("argv", "nodes", "per_node"),
    [
        (["--model", "mixtral-8x7b", "--gpus", "128"], 16, 8),
        (["--model", "mixtral-8x22b", "--gpus", "64", "--capacity-factor", "1"], 8, 8),
        (["--model", "tiny-moe", "--gpus", "6", "--global-batch", "12", "--dropless"], 1, 6),
    ],
    ids=["mixtral-8x7b-128", "mixtral-8x22b-64-cf1", "tiny-moe-6"],
)
def test_plan_prints_a_launchable_command_that_passes_check_job(capsys, argv, nodes, per_node):
    command = _printed_command(capsys, ["plan", *argv, "--top", "1"])
    assert command[0] == "torchrun"
    module = command.index("-m")
    launcher = get_args_parser().parse_args([*command[1:module], "unused.py"])
    assert int(launcher.nnodes.split(":")[-1]) == nodes  # "N" or torchrun's default "1:1"
    assert int(launcher.nproc_per_node) == per_node
    if nodes > 1:
        assert launcher.rdzv_backend == "c10d" and launcher.rdzv_endpoint == "node0:29500"
    else:
        assert launcher.standalone
    assert command[module + 1] == "moefold"
    args = build_parser().parse_args(command[module + 2 :])
    assert args.command == "train"
    job = load_job(args.config, args.overrides)
    world = nodes * per_node
    ParallelLayout.from_config(job.parallel, world)
    check_job(job, world)
