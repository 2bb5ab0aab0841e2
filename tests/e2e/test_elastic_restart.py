"""A rank SIGKILLed under plain `torchrun --max-restarts 2 --rdzv-backend c10d` (torchrun's own
elastic agent, the way a multi-node job restarts): the restarted workers resume from the newest
checkpoint and the run ends with the losses of an uninterrupted run.

Before each attempt's store keys got their own prefix (launch.init_distributed), restarted gloo
workers read the dead attempt's addresses from the agent's store and failed in connectFullMesh.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from moefold.train.metrics import read_metrics
from tests.e2e.test_fault_tolerance import worker_pids
from tests.e2e.test_train import TINY


@pytest.mark.slow
def test_sigkilled_rank_under_torchrun_elastic_matches_uninterrupted_run(tmp_path):
    settings = [
        *TINY,
        "model.hidden=64",
        "train.steps=8",
        "checkpoint.every=2",
        "train.seq_len=64",
        "train.micro_batch=2",
        "train.eval_every=0",
        "train.eval_batches=4",
        "parallel.ep=2",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]

    def launch(name, restarts):
        args = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=4",
            f"--max-restarts={restarts}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0",
            "-m",
            "moefold",
            "train",
            "--config",
            "tiny-moe",
            "--out",
            str(tmp_path / name),
        ]
        for item in settings:
            args += ["--set", item]
        env = {**os.environ, "MOEFOLD_TEST_PARENT": str(os.getpid())}
        log = open(tmp_path / f"{name}.log", "w")  # a file, not a pipe nobody drains
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)

    def tail(name):
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    reference = launch("ref", 0)
    assert reference.wait(timeout=600) == 0, tail("ref")
    victim = launch("run", 2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and victim.poll() is None and not killed:
        rows = read_metrics(metrics) if metrics.exists() else []
        if rows and rows[-1]["step"] >= 5:
            pids = worker_pids(os.getpid())
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    assert killed, "the run ended before step 5 could be interrupted"
    assert victim.wait(timeout=600) == 0, tail("run")
    assert "connectFullMesh" not in tail("run")
    got = [(r["step"], r["loss"]) for r in read_metrics(metrics)]
    want = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert got == want
