"""One recipe for the restart tests: run 4 ranks uninterrupted, run them again and SIGKILL rank 1
once step 5 is logged, and hand back both runs' losses. The launcher (moefold's `--nproc
--max-restarts` or plain torchrun's elastic agent) is the test's choice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moefold.train.metrics import read_metrics
from tests.e2e.test_train import TINY

KILL_SETTINGS = [
    *TINY,
    "model.hidden=64",
    "train.steps=8",
    "checkpoint.every=2",
    "train.seq_len=64",
    "train.micro_batch=2",
    "train.eval_every=0",
    "train.eval_batches=4",
    "parallel.ep=2",
]


def worker_pids(parent_pid: int) -> dict[int, int]:
    """rank -> pid of the moefold workers below a torchrun process (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if (
            b"moefold" in cmdline
            and env.get(b"TORCHELASTIC_RUN_ID")
            and b"RANK" in env
            and str(parent_pid).encode() in env.get(b"MOEFOLD_TEST_PARENT", b"")
        ):
            found[int(env[b"RANK"])] = int(entry.name)
    return found


def kill_rank_one_after_step_five(
    tmp_path: Path, launcher: Callable[[int], list[str]]
) -> tuple[list, list, str]:
    """(losses of the killed run, losses of the uninterrupted one, the killed run's log tail).

    `launcher(max_restarts)` gives the command line up to `train`'s own flags; the run folder
    is tmp_path/ref or tmp_path/run and KILL_SETTINGS are appended."""

    def launch(name: str, restarts: int) -> subprocess.Popen:
        args = [*launcher(restarts), "--out", str(tmp_path / name)]
        for item in [*KILL_SETTINGS, f"data.cache_dir={tmp_path / 'cache'}"]:
            args += ["--set", item]
        env = {**os.environ, "MOEFOLD_TEST_PARENT": str(os.getpid())}
        log = open(tmp_path / f"{name}.log", "w")  # a file, not a pipe nobody drains
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)

    def tail(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    reference = launch("ref", 0)
    assert reference.wait(timeout=600) == 0, tail("ref")
    victim = launch("run", 2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a hang guard, not a timing assertion
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
    got = [(r["step"], r["loss"]) for r in read_metrics(metrics)]
    want = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    return got, want, tail("run")


def moefold_train(*extra: str) -> list[str]:
    return [sys.executable, "-m", "moefold", "train", "--config", "tiny-moe", *extra]
