"""The planner's figures for the layout a dry run builds (memory: moefold/plan/memory.py;
bytes sent per family: moefold/plan/cost.py), in the dry run's row keys, so each measured rank
can be printed beside its prediction."""

from __future__ import annotations

import torch

from moefold.config import JobConfig
from moefold.plan.cost import Candidate, CostModel, moefold_workload
from moefold.plan.hardware import gpu_device
from moefold.plan.search import topology


def candidate_of(job: JobConfig, world_size: int) -> Candidate:
    par, train = job.parallel, job.train
    dp = world_size // (par.tp * par.cp * par.pp)
    return Candidate(
        tp=par.tp,
        cp=par.cp,
        pp=par.pp,
        vpp=par.vpp,
        dp=dp,
        ep=par.ep,
        etp=par.etp,
        edp=world_size // (par.pp * par.ep * par.etp),
        micro_batch=train.micro_batch,
        recompute=train.recompute == "full",
        distributed_optimizer=par.distributed_optimizer,
    )


class PlannerFigures:
    """Planner bytes per pipeline rank for one job and world size; `device` only sets the
    allocator and runtime overheads (left out of `memory`, which counts the tensors)."""

    def __init__(self, job: JobConfig, world_size: int, device: str = "h100") -> None:
        train = job.train
        workload = moefold_workload(
            job.model,
            job.moe,
            train.seq_len,
            train.global_batch,
            train.dtype,
            job.parallel.grad_compression,
        )
        dtype = torch.bfloat16 if job.train.dtype == "bf16" else torch.float32
        self.device = gpu_device(device, dtype)
        self.candidate = candidate_of(job, world_size)
        c = self.candidate
        self.topology = topology(world_size, c.tp, c.cp, c.pp, c.ep, c.etp, True, 8)
        self.model = CostModel(workload, self.device)

    def memory(self, pp_rank: int) -> dict[str, int]:
        mem = self.model.memory(self.candidate, self.topology, pp_rank)
        overhead = 1 + self.device.allocator_overhead
        activations = mem["activations"] / overhead  # the tensors themselves, as measured
        row = {
            "params": mem["weights"],
            "grads": mem["gradients"],
            "optimizer": mem["optimizer"],
            "activations_peak": activations + mem["dispatcher"] / overhead,
        }
        rounded = {key: int(round(value)) for key, value in row.items()}
        rounded["total"] = sum(rounded.values())
        return rounded

    def comm(self, pp_rank: int) -> dict[str, int]:
        """Bytes pipeline rank `pp_rank` sends per step, per family (CommStats' families)."""
        c, model = self.candidate, self.model
        rank_cost = model.rank(c, self.topology, pp_rank)
        micro_batches = model.w.global_batch // (c.dp * c.micro_batch)
        sent = {f: micro_batches * rank_cost.cost.sent[f] for f in ("tp", "cp", "ep", "etp", "pp")}
        sent.update(model.data_parallel(c, self.topology, rank_cost)[1])
        return {family: int(round(value)) for family, value in sent.items() if value}
