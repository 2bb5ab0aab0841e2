"""A single-process checkpoint must not slow the rest of the run down.

DCP's plan gather on gloo copies tensors in gloo's worker thread; with more than one intra-op
thread that copy starts a second OpenMP team, and libgomp, then managing more threads than CPUs,
stops spinning between parallel regions for the rest of the process (a tiny-moe CPU run went
from 245 to 460-540 ms a step after its first checkpoint). One process has nothing to gather,
so moefold saves and loads without collectives there. The visible symptom of a regression is
the extra OpenMP thread, counted here in a fresh interpreter with two intra-op threads (the
forked ranks of `run_ranks` have one, where the team never forms) on the full tiny-moe, whose
gathered plan is large enough for a parallel copy (with 1 layer it is not, and this test could
not fail).
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
    reason="counts threads in /proc; an OpenMP team needs 2 CPUs",
)

SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
from moefold.checkpoint import list_checkpoints, load_checkpoint
from moefold.config import load_job
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.train.launch import build_trainer, init_distributed

torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
init_distributed(torch.device("cpu"))
job = load_job("tiny-moe", json.loads(sys.argv[1]))
groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, 1))
trainer = build_trainer(job, groups, Path(sys.argv[2]), torch.device("cpu"))
trainer.train_step()
counts = [threads()]
trainer.save()
counts.append(threads())
path = list_checkpoints(trainer.checkpoint_root)[-1]
load_checkpoint(path, trainer.model, trainer.optimizer, groups)
counts.append(threads())
print(json.dumps(counts))
"""


def test_single_process_save_and_load_start_no_threads(tmp_path):
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(overrides), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, after_save, after_load = json.loads(result.stdout.strip().splitlines()[-1])
    assert after_save == before, "saving started threads (collectives on one process?)"
    assert after_load == before, "loading started threads (collectives on one process?)"
