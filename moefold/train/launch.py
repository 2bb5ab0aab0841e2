"""Build everything a run needs, in one documented order, and train.

init_process_group -> ParallelGroups -> data -> full model (deterministic init) ->
parallelize_model (tp, cp, ep, pipeline split, dp families) -> recomputation -> Trainer.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moefold.config import JobConfig, job_to_toml
from moefold.data import build_datasets
from moefold.model import build_model
from moefold.model.gemm import resolve_bf16_gemm
from moefold.parallel.apply import parallelize_model
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import ParallelGroups, build_parallel_groups
from moefold.train.host_memory import keep_freed_host_memory
from moefold.train.trainer import Trainer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    """gloo on CPU, nccl on CUDA; a one-rank group when not launched by torchrun."""
    if dist.is_initialized():
        return
    # On CUDA, NCCL carries device tensors and gloo the few small CPU tensors (metrics, counts).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def build_trainer(
    job: JobConfig, groups: ParallelGroups, out_dir: Path, device: torch.device
) -> Trainer:
    """Datasets (rank 0 builds caches first), the parallelised model and its Trainer."""
    if not groups.is_logging_rank:
        groups.barrier()
    train_data, val_data, _ = build_datasets(
        job.data, job.model.vocab_size, job.train.seq_len, job.train.seed
    )
    if groups.is_logging_rank:
        groups.barrier()
    model, stages = parallelize_model(build_model(job).to(device), job, groups)
    model.set_recompute(job.train.recompute)
    model.set_bf16_gemm(resolve_bf16_gemm(job.train.bf16_gemm, device, job.model.hidden))
    return Trainer(job, model, stages, groups, train_data, val_data, out_dir, device)


def run_training(job: JobConfig, out_dir: Path, device_name: str = "auto") -> list[dict]:
    device = resolve_device(device_name)
    if job.train.keep_host_memory:
        keep_freed_host_memory()  # process-wide, so before any large allocation
    init_distributed(device)
    try:
        torch.manual_seed(job.train.seed)
        layout = ParallelLayout.from_config(job.parallel, dist.get_world_size())
        groups = build_parallel_groups(layout, device.type)
        if groups.is_logging_rank:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.toml").write_text(job_to_toml(job))
        trainer = build_trainer(job, groups, out_dir, device)
        rows = trainer.train()
        dist.barrier()  # no rank tears down its groups while another still communicates
        return rows
    finally:
        dist.destroy_process_group()
