"""Build everything a run needs, in one documented order, and train.

run-folder checks (writable, free space) and lock -> logging -> init_process_group ->
ParallelGroups -> data -> meta-device model -> parallelize_model (tp, cp, ep, pipeline split,
dp families) -> materialise this rank's shards (deterministic init) -> recomputation ->
Trainer -> heartbeat -> train.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moefold.config import JobConfig
from moefold.data import build_datasets
from moefold.kernels.gemm import resolve_bf16_gemm
from moefold.model import build_model, materialize
from moefold.model.size import count_parameters
from moefold.parallel.apply import parallelize_model, shard_index
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import ParallelGroups, build_parallel_groups
from moefold.run_dir import checkpoint_root as run_checkpoint_root
from moefold.safe_io import RunLock, check_free_space, check_writable
from moefold.train.heartbeat import HEARTBEAT_DIR, Heartbeat
from moefold.train.host_memory import keep_freed_host_memory
from moefold.train.peak import PeakFlops, mfu_peak
from moefold.train.progress import emit
from moefold.train.run_log import run_logging
from moefold.train.trainer import Trainer


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process; cli.py reads it from torchrun's environment."""

    launched: bool = False  # started by torchrun (env:// rendezvous); False: one process
    rank: int = 0
    local_rank: int = 0
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: which attempt of the worker group
    cache_dir: str | None = None  # where the measured CPU peak is cached (None: ~/.cache/moefold)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(
    device: torch.device, launch: Launch | None = None, timeout_s: float = 300.0
) -> None:
    """gloo on CPU, nccl on CUDA; a one-rank group when not launched by torchrun.

    torchrun's elastic agent (c10d rendezvous) keeps ONE TCPStore for every restart of a job,
    and torch adds no per-attempt prefix to it, so the keys of a failed attempt stay there: a
    restarted gloo worker could read a dead worker's address before the live one overwrote it
    and fail in connectFullMesh ("connection refused" to the old port). Each attempt's keys
    therefore live under their own prefix.
    """
    if dist.is_initialized():
        return
    # On CUDA, NCCL carries device tensors and gloo the few small CPU tensors (metrics, counts).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if launch is not None and launch.launched:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"moefold/attempt_{launch.restart_count}", store)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


def checkpoint_bytes(job: JobConfig) -> int:
    """About one checkpoint: fp32 weights and AdamW's two moments."""
    return count_parameters(job.model, job.moe).total * 4 * 3


def check_run_folders(job: JobConfig, out_dir: Path, checkpoint_root: Path) -> None:
    """Checks that need no process group: both folders writable, room for one checkpoint."""
    check_writable(out_dir, "--out")
    check_writable(checkpoint_root, "checkpoint.dir")
    check_free_space(checkpoint_root, checkpoint_bytes(job), "one checkpoint")


def build_trainer(
    job: JobConfig,
    groups: ParallelGroups,
    out_dir: Path,
    device: torch.device,
    peak: PeakFlops | None = None,
) -> Trainer:
    """Datasets (rank 0 builds caches first), the parallelised model and its Trainer, whose
    MFU is reported against `peak` (none: no MFU, nothing measured)."""
    if not groups.is_logging_rank:
        groups.barrier()
    else:  # the first run of a corpus trains its tokenizer and encodes it (tens of seconds)
        emit(f"moefold: preparing data (data.source={job.data.source}; cached after the first run)")
    started = time.perf_counter()
    train_data, val_data, _ = build_datasets(
        job.data, job.model.vocab_size, job.train.seq_len, job.train.seed
    )
    if groups.is_logging_rank:
        emit(
            f"moefold: data ready in {time.perf_counter() - started:.1f} s: "
            f"{len(train_data)} train / {len(val_data)} validation sequences"
        )
        groups.barrier()
    # Sharded construction: a storage-less skeleton, the parallel plan, then only this rank's
    # shards get memory, filled with their slices of the single-process values (model/init.py).
    model, stages = parallelize_model(build_model(job, device="meta"), job, groups)
    dtype = torch.bfloat16 if job.train.dtype == "bf16" else None  # Megatron-style bf16
    materialize(model, job.model, job.train.seed, device, shard_index(groups), dtype)
    model.set_recompute(job.train.recompute)
    model.set_bf16_gemm(resolve_bf16_gemm(job.train.bf16_gemm, device, job.model.hidden))
    return Trainer(job, model, stages, groups, train_data, val_data, out_dir, device, peak)


def run_training(
    job: JobConfig, out_dir: Path, device_name: str = "auto", launch: Launch | None = None
) -> list[dict]:
    """Train one run into out_dir. Rank 0 holds the folder's lock for the whole run; the
    folder checks run before any process group starts (a refused run leaves no trace)."""
    launch = launch or Launch()
    checkpoint_root = run_checkpoint_root(out_dir, job.checkpoint.dir)
    check_run_folders(job, out_dir, checkpoint_root)
    with contextlib.ExitStack() as stack:
        if launch.rank == 0:
            stack.enter_context(RunLock(out_dir))
        stack.enter_context(run_logging(out_dir, launch.rank))
        return _train_in_process_group(job, out_dir, device_name, launch, stack)


def _train_in_process_group(job, out_dir, device_name, launch, stack) -> list[dict]:
    device = resolve_device(device_name, launch.local_rank)
    if job.train.keep_host_memory:
        keep_freed_host_memory()  # process-wide, so before any large allocation
    init_distributed(device, launch, job.parallel.timeout_s)
    stack.callback(dist.destroy_process_group)
    torch.manual_seed(job.train.seed)
    layout = ParallelLayout.from_config(job.parallel, dist.get_world_size())
    groups = build_parallel_groups(
        layout, device.type, timeout=timedelta(seconds=job.parallel.timeout_s)
    )
    # Measured once per machine and cached (CPU) or looked up (GPU); only rank 0 reports MFU.
    peak = (
        mfu_peak(job.train, device, job.model.hidden, launch.cache_dir)
        if groups.is_logging_rank
        else None
    )
    trainer = build_trainer(job, groups, out_dir, device, peak)
    if job.parallel.heartbeat_s > 0:
        heartbeat = Heartbeat(
            out_dir / HEARTBEAT_DIR,
            groups.rank,
            groups.world_size,
            lambda: trainer.step + 1,  # the step in progress
            job.parallel.heartbeat_s,
            watch=groups.is_logging_rank,
        )
        stack.callback(heartbeat.stop)
        heartbeat.start()
    rows = trainer.train()
    dist.barrier()  # no rank tears down its groups while another still communicates
    return rows
