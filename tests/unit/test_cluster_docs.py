"""docs/cluster.md and the Slurm template: the torchrun commands they show parse with
torchrun's own parser and their moefold arguments pass every config check."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from torch.distributed.run import get_args_parser

from moefold.cli import build_parser
from moefold.config import check_job, load_job
from moefold.parallel.layout import ParallelLayout

REPO = Path(__file__).resolve().parents[2]


def _check_torchrun(command: str, nodes: int, per_node: int) -> None:
    words = shlex.split(command.replace("\\\n", " "))
    module = words.index("-m")
    launcher = get_args_parser().parse_args([*words[1:module], "unused.py"])
    assert launcher.rdzv_backend == "c10d" and launcher.rdzv_endpoint.endswith(":29500")
    args = build_parser().parse_args(words[module + 2 :])
    job = load_job(args.config, args.overrides)
    ParallelLayout.from_config(job.parallel, nodes * per_node)
    check_job(job, nodes * per_node)
    assert args.out  # a cluster run names its folder (restarts resume it)


def test_cluster_doc_multi_node_command_parses_and_passes_check_job():
    text = (REPO / "docs" / "cluster.md").read_text()
    block = re.search(r"```bash\nexport MASTER_ADDR=node0.*?\n(torchrun .*?)```", text, re.S)
    assert block
    command = block.group(1).replace("$MASTER_ADDR", "node0")
    assert "--nnodes 2 --nproc-per-node 8" in command
    _check_torchrun(command, 2, 8)


def test_slurm_template_launches_torchrun_per_node_with_a_valid_layout():
    text = (REPO / "scripts" / "slurm_train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "--rdzv-backend c10d" in text
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    per_node = int(re.search(r"GPUS_PER_NODE=\$\{GPUS_PER_NODE:-(\d+)\}", text).group(1))
    command = text[text.index("srun") :].split("\n\n")[0]
    command = command[command.index("torchrun") :]
    env = {
        "$SLURM_JOB_NUM_NODES": str(nodes),
        "$GPUS_PER_NODE": str(per_node),
        "$MASTER_ADDR:$MASTER_PORT": "node0:29500",
        "$SLURM_JOB_ID": "42",
        "$RUN_DIR": "runs/x",
    }
    for name, value in env.items():
        command = command.replace(name, value)
    _check_torchrun(command, nodes, per_node)


def test_choosing_layouts_torchrun_examples_launch_as_written():
    text = (REPO / "docs" / "choosing_layouts.md").read_text()
    commands = re.findall(r"```bash\n(torchrun .*?)```", text, re.S)
    assert len(commands) >= 2
    for command in commands:
        command = command.replace("$MASTER_ADDR", "node0").replace("$RUN_ID", "7")
        nodes = int(re.search(r"--nnodes (\d+)", command).group(1))
        per_node = int(re.search(r"--nproc-per-node (\d+)", command).group(1))
        _check_torchrun(command, nodes, per_node)
