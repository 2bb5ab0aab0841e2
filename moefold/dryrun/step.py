"""One whole optimizer step of rank r on fake tensors: the real trainer's forward, backward,
gradient reduction and optimizer step, with no real memory and no data.

Sharded construction (meta model -> parallel plan -> materialise this rank's shards) runs under
torch's FakeTensorMode, so parameters, activations, gradients and optimizer state are tensors
with shapes and no storage. MoE routing has no values there: every dispatcher gets the run's
RoutingOverride (moefold/dryrun/routing.py). torch's MemTracker follows every tensor the step
creates; the parameter, gradient and optimizer bytes are read from the tensors the model and
the optimizer hold (unique storages), the activation peak from the tracker.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from moefold.config import JobConfig
from moefold.dispatch.all_to_all import AllToAllDispatcher
from moefold.dispatch.local import LocalDispatcher
from moefold.dryrun.routing import RoutingOverride
from moefold.dryrun.tracker import StepMemory
from moefold.dryrun.world import fake_process_group
from moefold.model import build_model, materialize
from moefold.model.moe import MoELayer
from moefold.model.transformer import causal_attention
from moefold.parallel.apply import parallelize_model, shard_index
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.parallel.mixed_precision import grad_of
from moefold.train.lr_schedule import lr_at
from moefold.train.trainer import Trainer

DEVICE = torch.device("cpu")


class SyntheticTokens:
    """The validation set's interface (the Trainer wants one; the dry run never evaluates)."""

    def __init__(self, num_sequences: int, seq_len: int) -> None:
        self.num_sequences, self.seq_len = num_sequences, seq_len

    def __len__(self) -> int:
        return self.num_sequences


class SyntheticLoader:
    """Stands in for the trainer's BatchLoader: this rank's micro-batches of token id 0, real
    (tiny) tensors made outside fake mode. A dry run reads no data."""

    def __init__(self, job: JobConfig, dp_size: int) -> None:
        train = job.train
        self.shape = (train.micro_batch, train.seq_len + 1)
        self.count = train.global_batch // train.micro_batch // dp_size

    def next_batch(self) -> list[torch.Tensor]:
        with unset_fake_temporarily():
            return [torch.zeros(self.shape, dtype=torch.long) for _ in range(self.count)]


@dataclass
class RankResult:
    rank: int
    param_count: int
    shard_keys: list[tuple[str, tuple[tuple[int, int], ...]]]  # (name, index) of each param
    memory_bytes: dict[str, int]
    comm_bytes: dict[str, int]
    pp_rank: int


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = id(st) if not hasattr(st, "_cdata") else st._cdata
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _grad_tensors(model, optimizer) -> list[torch.Tensor | None]:
    # bf16: the fp32 main gradients; gradients in buckets are views of the buckets' buffers
    grads = [grad_of(p) for p in model.parameters()]
    grads += [bucket.grad_data for bucket in optimizer.reducer.buckets]
    # ZeRO-1 with bf16 reduction: the fp32 upcast of this rank's reduced slice
    grads += [p.grad for group in optimizer.optimizer.param_groups for p in group["params"]]
    return grads


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    slots = optimizer.optimizer.state.values()
    state = [t for slot in slots for t in slot.values() if torch.is_tensor(t)]
    return state + optimizer.main_params()


def _device_attention(q_BHSDh, k_BGSDh, v_BGSDh, positions_S, bf16_gemm="auto"):
    """The attention a GPU runs: fused SDPA (flash / memory-efficient), which saves the output
    and the softmax statistics, never the S x S probabilities. On fake CPU tensors torch's SDPA
    takes its flash kernel; moefold's bf16 CPU kernel (kernels/cpu_attention.py) would save the
    probabilities (0.75 GiB per layer and micro-batch for Mixtral-8x22B at 4096 tokens)."""
    return F.scaled_dot_product_attention(
        q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True, enable_gqa=True
    )


def _static_pipeline_votes(runner) -> None:
    """torch.distributed.pipelining starts a schedule with a vote over the stages (1: every
    stage has static shapes) and reads it with .item(); on fake tensors over a fake group the
    vote has no value. moefold gives every stage static shapes (moefold/schedules.py), so each
    of this run's stages runs the vote's messages on host tensors and reads the answer 1.
    Private torch methods, wrapped on these stage objects only."""
    schedule = getattr(runner, "schedule", None)
    if schedule is None:  # pp = 1: no pipeline schedule
        return
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    for stage in stages:
        forward_vote, backward_result = stage._warmup_forward_vote, stage._warmup_backward_result

        def vote(has_backward, received_acc=None, _run=forward_vote):
            with unset_fake_temporarily():
                _run(has_backward, torch.ones(1, dtype=torch.int32))
            return torch.tensor([1], dtype=torch.int32)  # a fake constant: .item() reads it

        def result(received_result=None, _run=backward_result):
            with unset_fake_temporarily():
                _run(torch.ones(1, dtype=torch.int32))
            return torch.tensor([1], dtype=torch.int32)

        stage._warmup_forward_vote, stage._warmup_backward_result = vote, result


def run_rank(job: JobConfig, world_size: int, rank: int, routing: RoutingOverride) -> RankResult:
    """Rank `rank`'s one optimizer step on fake tensors (see the module doc)."""
    with fake_process_group(rank, world_size):
        layout = ParallelLayout.from_config(job.parallel, world_size)
        groups = build_parallel_groups(layout, DEVICE.type)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model, stages = parallelize_model(build_model(job, device="meta"), job, groups)
            index_of = shard_index(groups)
            keys = [
                (name, tuple((s.start, s.stop) for s in index_of(name, p)[1]))
                for name, p in model.named_parameters()
            ]
            dtype = torch.bfloat16 if job.train.dtype == "bf16" else None
            materialize(model, job.model, job.train.seed, DEVICE, index_of, dtype)
            for layer in model.modules():
                if isinstance(layer, MoELayer):
                    dispatcher = layer.dispatcher  # check_dry_run refused allgather and dedup
                    assert isinstance(dispatcher, LocalDispatcher | AllToAllDispatcher)
                    dispatcher.routing_override = routing
                    # the GPU's grouped_mm where its meta kernel can run: it takes bf16 only
                    # (the CUDA rule), so fp32 fake tensors run the per-expert loop (CPU's
                    # default for large experts; same weights, fewer saved activations)
                    bf16 = job.train.dtype == "bf16"
                    layer.experts.grouped_gemm = "on" if bf16 else "off"
            for module in model.modules():  # the GPU's attention (context parallel keeps its own)
                if getattr(module, "attention_fn", None) is causal_attention:
                    module.attention_fn = _device_attention
            model.set_recompute(job.train.recompute)
            model.set_bf16_gemm("native")  # bf16 GEMMs as on a GPU: no CPU fp32 upcast copies
            data = SyntheticTokens(job.train.global_batch, job.train.seq_len)
            out_dir = Path(tempfile.mkdtemp(prefix="moefold-dry-run-"))
            trainer = Trainer(job, model, stages, groups, data, data, out_dir, DEVICE)
            trainer.loader = SyntheticLoader(job, groups.size("dp"))
            _static_pipeline_votes(trainer.runner)
            optimizer = trainer.optimizer
            tracker = StepMemory()
            tracker.ignore([*model.parameters(), *model.buffers()])
            tracker.ignore(_optimizer_tensors(optimizer) + _grad_tensors(model, optimizer))
            groups.comm_stats.reset()
            reduce = optimizer.reduce_gradients
            marks: list[int] = []

            accumulated: list[tuple[int, set]] = []

            def marked_reduce():  # where forward/backward ends and the last reduction starts
                marks.append(len(tracker.events))
                # the gradients as backward leaves them (ZeRO-1 frees them once reduced)
                live = _grad_tensors(model, optimizer)
                keys = {tracker.key_of(t) for t in live if t is not None}
                accumulated.append((_storage_bytes(live), keys))
                del live
                reduce()

            optimizer.reduce_gradients = marked_reduce  # this run's optimizer object only
            with tracker:
                trainer.compute_gradients()
                after_backward = len(tracker.events)
                grad_tensors = _grad_tensors(model, optimizer)
                grads = max(_storage_bytes(grad_tensors), accumulated[-1][0])
                optimizer.grad_norm()
                optimizer.step(lr_at(0, job.train))
            params = _storage_bytes(model.parameters())
            state_tensors = _optimizer_tensors(optimizer)
            state = _storage_bytes(state_tensors)
            held = {tracker.key_of(t) for t in grad_tensors + state_tensors if t is not None}
            # the reduction frees the gradients backward left (ZeRO-1) as it copies them into
            # its buckets: its peak counts those frees, so only what the step keeps is left out
            kept = set(held)
            held |= accumulated[-1][1]
            # forward + backward, gradients (kept for the step) excluded; then the gradient
            # reduction's own buffers (flat buckets), reported apart
            activations = tracker.peak(exclude=held, until=marks[0])
            reduction = tracker.peak(exclude=kept, start=marks[0], until=after_backward)
        memory = {
            "params": params,
            "grads": grads,
            "optimizer": state,
            "activations_peak": activations,
            "grad_reduction_peak": reduction,
            "total": params + grads + state + max(activations, reduction),
        }
        return RankResult(
            rank=rank,
            param_count=sum(p.numel() for p in model.parameters()),
            shard_keys=keys,
            memory_bytes=memory,
            comm_bytes=groups.comm_stats.as_dict(),
            pp_rank=groups.coord("pp"),
        )
