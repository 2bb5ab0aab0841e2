"""Run a function on N gloo ranks in forked processes and return what each rank returned.

This is the harness of the D and E test tiers (docs/testing.md). Ranks are forked, not spawned:
forking 8 ranks costs a fraction of a second where `spawn` re-imports torch in every child.

Fork caveats learned on this machine (torch 2.13 CPU, libgomp):
- A child that runs an intra-op parallel kernel after the parent has already used its OpenMP
  thread pool deadlocks. Each child therefore calls `torch.set_num_threads(1)` before anything
  else. Do not remove it.
- The test body `fn` and its arguments reach the children through fork, so they need not be
  picklable (closures and lambdas work). Only return values cross a pipe and must pickle.
- Return values travel as plain pickle bytes, so tensors are copied by value. The pipe's own
  ForkingPickler would share them through file descriptors served by the child, which has
  usually exited by the time the parent unpickles (FileNotFoundError / ConnectionResetError).
- Children inherit the parent's RNG state; seed inside `fn` if the body draws random numbers.
"""

import faulthandler
import gc
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# After the first rank fails, the others usually fail within milliseconds ("Connection closed by
# peer"). Ranks still running after this grace period are killed and reported as hung.
_GRACE_AFTER_FAILURE_S = 3.0
# How long to wait for a hung child to write its stack dump, and for a finished child to exit.
_STACK_DUMP_WAIT_S = 1.0
_EXIT_WAIT_S = 5.0


class RanksFailed(RuntimeError):
    """One or more ranks raised, died, or were killed; the message holds every traceback.

    Attributes:
        failures: rank -> formatted traceback (or exit description) of ranks that failed,
            in the order they happened; the first entry is usually the root cause.
        hung: rank -> Python stack dump (all threads) of ranks killed while still running.
    """

    def __init__(self, message: str, failures: dict[int, str], hung: dict[int, str]):
        super().__init__(message)
        self.failures = failures
        self.hung = hung


class RanksTimedOut(RanksFailed):
    """No rank failed, but some ranks had not finished when the timeout expired."""


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` forked gloo ranks.

    Each child sets one intra-op thread, turns on deterministic algorithms, joins a default
    gloo process group of `world_size` ranks through a FileStore in a fresh temporary directory,
    runs `fn`, and destroys the process group in a `finally`.

    Args:
        fn: test body; called with the rank and world size first. Need not be picklable.
        world_size: number of ranks, at least 1.
        *args, **kwargs: passed to `fn` unchanged.
        timeout: hard wall-clock limit in seconds for the whole run; also the gloo collective
            timeout inside the children. On expiry every child is killed.

    Returns:
        The return values of `fn`, indexed by rank. They must pickle; tensors arrive as copies.

    Raises:
        RanksFailed: a rank raised, died, or returned something unpicklable. Lists every
            failing rank's traceback and the stacks of ranks killed while still running.
        RanksTimedOut: nothing failed but some ranks were still running at the timeout.
    """
    __tracebackhide__ = True  # pytest: show the ranks' tracebacks, not this frame's source
    if world_size < 1:
        raise ValueError(f"run_ranks: world_size must be >= 1, got {world_size}")
    if dist.is_initialized():
        raise ValueError(
            "run_ranks: this process already has a default process group; forked children "
            "would inherit it. Call run_ranks from a process without one."
        )
    # use_deterministic_algorithms imports torch._inductor.config (~800 modules, ~1 s) on first
    # use. Pay that once here, where forked children inherit it, not once per child (about 5 s
    # for 8 ranks on 2 cores). Setting the current mode again changes nothing.
    torch.use_deterministic_algorithms(
        torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    # Collect the parent's garbage here, then freeze what is left: otherwise a child's garbage
    # collector may finalize objects it inherited (e.g. a destroyed gloo process group from an
    # earlier in-process run), whose destructors wait for threads that do not exist after fork
    # and hang the child.
    gc.collect()
    gc.freeze()
    ctx = multiprocessing.get_context("fork")
    tmp_dir = tempfile.mkdtemp(prefix="moefold-ranks-")
    procs: list[multiprocessing.process.BaseProcess] = []
    readers: list[multiprocessing.connection.Connection] = []
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child_main,
                args=(fn, rank, world_size, args, kwargs, tmp_dir, timeout, writer),
                name=f"moefold-rank{rank}",
            )
            proc.start()
            # Close the parent's copy now so that later children do not inherit it and a dead
            # child shows up as EOF on its reader.
            writer.close()
            procs.append(proc)
            readers.append(reader)
        results, failures, pending = _collect(procs, readers, tmp_dir, timeout)
        hung = _dump_stacks(procs, pending, tmp_dir)
        for rank in pending:
            procs[rank].kill()
    finally:
        gc.unfreeze()
        _kill_and_reap(procs)
        for reader in readers:
            reader.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if failures or hung:
        error = RanksTimedOut if not failures else RanksFailed
        raise error(_failure_message(fn, world_size, timeout, failures, hung), failures, hung)
    return [results[rank] for rank in range(world_size)]


def _child_main(fn, rank, world_size, args, kwargs, tmp_dir, timeout, writer) -> None:
    torch.set_num_threads(1)  # first: the parent's forked OpenMP pool deadlocks (module doc)
    torch.use_deterministic_algorithms(True)
    with open(_stack_path(tmp_dir, rank), "w") as stack_file:
        # Crashes and the parent's SIGUSR1 (sent to hung ranks before the kill) dump all threads.
        faulthandler.enable(file=stack_file, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
        message = _run_in_group(fn, rank, world_size, args, kwargs, tmp_dir, timeout)
        # Plain pickle, not the pipe's ForkingPickler: that one shares tensors through file
        # descriptors that die with this process before the parent reads them.
        try:
            writer.send_bytes(pickle.dumps(message))
        except Exception:
            error = "the return value could not be sent:\n" + traceback.format_exc()
            writer.send_bytes(pickle.dumps(("error", error, time.monotonic())))
        writer.close()


def _run_in_group(fn, rank, world_size, args, kwargs, tmp_dir, timeout) -> tuple[str, Any, float]:
    """Returns ("ok", value, 0.0) or ("error", traceback, time of the failure).

    The failure time is taken before the process group is destroyed: the destroy makes peers
    fail too, and the parent orders failures by this time (CLOCK_MONOTONIC is system-wide).
    """
    try:
        store = dist.FileStore(os.path.join(tmp_dir, "store"), world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        # Everyone connected before anyone goes on: a rank whose mesh is complete could run a
        # short `fn`, destroy its group and close its sockets while a peer is still in gloo's
        # connectFullMesh, which then fails with "Connection closed by peer" (seen in CI).
        dist.barrier()
        try:
            return ("ok", fn(rank, world_size, *args, **kwargs), 0.0)
        except BaseException:
            return ("error", traceback.format_exc(), time.monotonic())
        finally:
            if dist.is_initialized():  # fn may have destroyed it itself
                dist.destroy_process_group()
    except BaseException:
        return ("error", traceback.format_exc(), time.monotonic())


def _collect(procs, readers, tmp_dir, timeout):
    """Read each rank's message until all arrived, the deadline, or the grace after a failure.

    Returns (results: rank -> value, failures: rank -> text ordered by failure time, pending
    ranks that sent nothing).
    """
    deadline = time.monotonic() + timeout
    pending = {reader: rank for rank, reader in enumerate(readers)}
    results: dict[int, Any] = {}
    failed_at: dict[int, tuple[float, str]] = {}
    while pending:
        limit = deadline
        if failed_at:
            first = min(when for when, _ in failed_at.values())
            limit = min(deadline, first + _GRACE_AFTER_FAILURE_S)
        remaining = limit - time.monotonic()
        if remaining <= 0:
            break
        for reader in multiprocessing.connection.wait(list(pending), timeout=remaining):
            rank = pending.pop(reader)
            try:
                status, payload, when = pickle.loads(reader.recv_bytes())
            except (EOFError, OSError):  # died before or while sending
                procs[rank].join(_EXIT_WAIT_S)
                status, payload = "error", _death_report(procs[rank], tmp_dir, rank)
                when = time.monotonic()
            if status == "ok":
                results[rank] = payload
            else:
                failed_at[rank] = (when, payload)
    order = sorted(failed_at, key=lambda rank: failed_at[rank][0])
    failures = {rank: failed_at[rank][1] for rank in order}
    return results, failures, sorted(pending.values())


def _death_report(proc, tmp_dir: str, rank: int) -> str:
    text = f"process exited with code {proc.exitcode} before sending a result"
    stack = _read_stack(tmp_dir, rank)
    return text + (f"; faulthandler output:\n{stack}" if stack else "")


def _dump_stacks(procs, ranks: list[int], tmp_dir: str) -> dict[int, str]:
    """Ask still-running ranks for a stack dump of all their threads (SIGUSR1 -> faulthandler)."""
    for rank in ranks:
        if procs[rank].is_alive():
            os.kill(procs[rank].pid, signal.SIGUSR1)
    stacks: dict[int, str] = {}
    deadline = time.monotonic() + _STACK_DUMP_WAIT_S
    for rank in ranks:
        while not _read_stack(tmp_dir, rank) and time.monotonic() < deadline:
            time.sleep(0.01)
        stacks[rank] = _read_stack(tmp_dir, rank) or "(no stack dump received)"
    return stacks


def _kill_and_reap(procs) -> None:
    """Leave no child behind: wait briefly for normal exit, SIGKILL the rest, reap everything."""
    deadline = time.monotonic() + _EXIT_WAIT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()


def _stack_path(tmp_dir: str, rank: int) -> str:
    return os.path.join(tmp_dir, f"rank{rank}.stack")


def _read_stack(tmp_dir: str, rank: int) -> str:
    try:
        with open(_stack_path(tmp_dir, rank)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _failure_message(fn, world_size, timeout, failures, hung) -> str:
    name = getattr(fn, "__qualname__", repr(fn))
    head = f"run_ranks({name}, world_size={world_size})"
    parts = []
    if failures:
        parts.append(f"{head}: ranks {list(failures)} failed (first: rank {next(iter(failures))})")
    if hung:
        why = f"within the {timeout:g} s timeout" if not failures else "after the first failure"
        parts.append(f"{head}: ranks {sorted(hung)} did not finish {why} and were killed")
    lines = ["; ".join(parts)]
    for rank, text in failures.items():
        lines += [f"----- rank {rank} failed -----", text.rstrip()]
    for rank, text in sorted(hung.items()):
        lines += [f"----- rank {rank} was still running; stack when killed -----", text]
    return "\n".join(lines)
