"""AdamW over the folded gradient families: replicated, or sharded (ZeRO-1 distributed optimizer).

Both classes give the trainer one interface: reduce_gradients, grad_norm, scale_gradients,
step(lr), and export_state / import_state for checkpoints (per-parameter tensors shaped like
the local parameter, so a checkpoint does not depend on which optimizer or layout wrote it).

ShardedAdamW (`parallel.distributed_optimizer = true`, Megatron's distributed optimizer):
the parameters of each (family, weight-decay) group are laid out bucket by bucket in contiguous
parameter and gradient buffers (parameters and gradients are views of them), and each bucket's
gradient buffer is reduce-scattered in place over the family's reduction group (dp x cp x tp
for replicated weights, dp x cp for tensor-parallel shards, edp for experts). Each rank keeps
AdamW moments (and, for bf16 parameters, fp32 master weights) for its 1/n slice only, steps
it, and all-gathers the updated slices back into the parameter buffers in place. Optimizer
memory per rank falls by the size of the reduction group.

Written here rather than with FSDP2's fully_shard: fully_shard reduces each parameter over
one mesh, but the replicated family must be summed over dp x cp x tp while its replicas of
the sharded families only span dp x cp, and FSDP2 would also shard the parameters themselves
(ZeRO-3), which is not what the issue asks for.

Gradient reduction runs in buckets (moefold/parallel/grad_buckets.py): one per family (ZeRO-1:
per (family, decay) group) after backward, or, with `parallel.overlap_grad_reduce`, buckets of
`parallel.grad_bucket_mb` launched during the step's last backward. Under ZeRO-1 every bucket
is reduce-scattered on its own, so this rank's masters are its 1/n slice of each bucket of
the group, one AdamW tensor per bucket.

Mixed precision (`train.dtype = "bf16"`, Megatron-Core's scheme): the model's parameters are
bf16; both classes keep fp32 main parameters and fp32 AdamW moments (ReplicatedAdamW: a full
fp32 copy of every bf16 parameter; ShardedAdamW: its 1/n master slices), step those and copy
(all-gather) the result back into the bf16 parameters. Gradients accumulate and reduce in
fp32 `main_grad`s, or in bf16 with `train.grad_reduce_dtype = "bf16"` (mixed_precision.py).
Bytes per parameter, as Megatron-Core counts them: 2 (bf16) + 4 (fp32 gradient) + 12 (master
and two moments), or 6 + 12/n with ZeRO-1; fp32 parameters are their own masters: 4 + 4 + 8,
or 8 + 8/n. The fp32 main parameters are saved in checkpoints under each parameter's "master"
entry beside the moments.

`parallel.grad_compression = "bytegrad"` replaces each bucket's collective by its 8-bit
compressed sum (moefold/parallel/compressed_reduce.py). Under ZeRO-1 only the gradient
reduce-scatter is compressed: the all-gather of the updated parameters stays in full precision.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moefold.config import ParallelConfig, TrainConfig
from moefold.parallel.compressed_reduce import build_grad_compressors
from moefold.parallel.data_parallel import (
    DISTINCT_GROUP,
    REDUCE_GROUP,
    grad_sum_of_squares,
    parameter_family,
)
from moefold.parallel.grad_buckets import (
    AllReduceBucket,
    GradReducer,
    ReduceScatterBucket,
    one_dtype,
    padded_flat,
    plan_buckets,
    rank_slice,
    runs_of,
    stats_family,
)
from moefold.parallel.mesh import ParallelGroups
from moefold.parallel.mixed_precision import accumulate_in_fp32, grad_of, set_grad

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "master"  # export_state key of the fp32 main parameter of a bf16 parameter


def _low_precision(param: nn.Parameter) -> bool:
    return param.dtype != torch.float32


def _prepare_mixed_precision(model: nn.Module, cfg: TrainConfig) -> None:
    """fp32 main gradients for bf16 parameters unless train.grad_reduce_dtype is bf16; before
    the reducer registers its own hooks."""
    if cfg.grad_reduce_dtype == "fp32":
        accumulate_in_fp32(list(model.parameters()))


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay on matrices only; never norms, biases or the embedding table (by choice:
    decaying rare-token rows toward zero hurts them more than it regularises)."""
    return param.ndim >= 2 and not name.startswith("embed.")


def _adamw(params_groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    # On CPU the fused kernel reads and writes each tensor once instead of once per AdamW
    # sub-operation: measured 23 vs 164 ms per step for 40M fp32 parameters on one thread
    # (decisions.md). Elsewhere foreach, as before (fused CUDA wants device-side step counts).
    on_cpu = all(p.device.type == "cpu" for group in params_groups for p in group["params"])
    implementation = {"fused": True} if on_cpu else {"foreach": True}
    return torch.optim.AdamW(
        params_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **implementation
    )


def _nbytes(named: list[tuple[str, nn.Parameter]]) -> list[int]:
    return [p.numel() * p.element_size() for _, p in named]


class ReplicatedAdamW:
    """Every rank holds the full AdamW state of its parameters; gradients are all-reduced.

    `bucket_bytes` None: one bucket per family, reduced after backward; a number: buckets of
    about that size, each launched from backward hooks once its gradients are final on the
    step's `backwards_per_step`-th backward (see grad_buckets.py).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        groups: ParallelGroups,
        bucket_bytes: float | None = None,
        backwards_per_step: int = 1,
        compressors: dict | None = None,
    ) -> None:
        self.model, self.groups = model, groups
        compressors = compressors or {}
        _prepare_mixed_precision(model, cfg)
        self.named = list(model.named_parameters())
        # fp32 main parameter of each bf16 one (the tensor AdamW steps); fp32 ones step in place
        self.masters = {
            id(p): p.detach().float().requires_grad_(p.requires_grad)
            for _, p in self.named
            if _low_precision(p)
        }
        reduced = [
            (n, p)
            for n, p in self.named
            if p.requires_grad and groups.size(REDUCE_GROUP[parameter_family(p)]) > 1
        ]
        families = [parameter_family(p) for _, p in reduced]
        plan = plan_buckets(_nbytes(reduced), families, bucket_bytes or math.inf)
        buckets = []
        for b in plan:
            group_name = REDUCE_GROUP[families[b[0]]]
            params = [reduced[i][1] for i in b]
            buckets.append(AllReduceBucket(params, group_name, groups, compressors.get(group_name)))
        self.reducer = GradReducer(buckets, bucket_bytes is not None, backwards_per_step)
        # gradients that are views of a bucket's buffer (the rest are autograd's own tensors)
        self.buffered = {id(p) for bucket in buckets for p in bucket.params}
        decay = [self._stepped(p) for n, p in self.named if decays(n, p)]
        no_decay = [self._stepped(p) for n, p in self.named if not decays(n, p)]
        self.optimizer = _adamw(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            cfg,
        )

    def _stepped(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor AdamW updates for `param`: its fp32 main parameter, or itself."""
        return self.masters.get(id(param), param)

    def reduce_gradients(self) -> None:
        """Sum every gradient over its family's group (waits for the buckets in flight)."""
        self.reducer.finish()

    def grad_norm(self) -> torch.Tensor:
        return grad_sum_of_squares(self.model, self.groups).sqrt()

    def scale_gradients(self, factor: float) -> None:
        grads = [grad_of(p) for _, p in self.named if grad_of(p) is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for _, param in self.named:  # main gradients (fp32 already, or the bf16 sum upcast)
            master = self.masters.get(id(param))
            if master is not None:
                grad = grad_of(param)
                master.grad = None if grad is None else grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for _, param in self.named:
                master = self.masters.get(id(param))
                if master is not None:
                    param.copy_(master)
        self.zero_grad()

    def zero_grad(self) -> None:
        """Buffered gradients zeroed in place (they stay views of their bucket); the others,
        and the fp32 main parameters' gradients, dropped."""
        for master in self.masters.values():
            master.grad = None
        self.reducer.zero_grad()
        for _, param in self.named:
            if id(param) not in self.buffered:
                set_grad(param, None)
                param.grad = None

    def reduced_gradients(self) -> dict[str, torch.Tensor]:
        """Each parameter's gradient after reduce_gradients (zeros where none arrived)."""
        out = {}
        for name, param in self.named:
            grad = grad_of(param)
            out[name] = torch.zeros_like(param) if grad is None else grad
        return out

    def main_params(self) -> list[torch.Tensor]:
        """The fp32 main parameters of bf16 ones (fp32 parameters are stepped in place)."""
        return list(self.masters.values())

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Re-read the fp32 main parameters from parameters loaded in place (init_from)."""
        for _, param in self.named:
            master = self.masters.get(id(param))
            if master is not None:
                master.copy_(param)

    def state_bytes(self) -> int:
        """Moments, and the fp32 main parameters of bf16 ones."""
        masters = sum(m.numel() * m.element_size() for m in self.main_params())
        return masters + sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )

    def export_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Live per-parameter state (created as zeros before the first step, so it can be
        loaded into)."""
        out = {}
        for name, param in self.named:
            stepped = self._stepped(param)
            slot = self.optimizer.state[stepped]
            if not slot:
                slot["step"] = torch.zeros((), dtype=torch.float32)
                for key in MOMENTS:
                    slot[key] = torch.zeros_like(stepped, memory_format=torch.preserve_format)
            out[name] = {"step": slot["step"], **{key: slot[key] for key in MOMENTS}}
            if stepped is not param:
                out[name][MASTER] = stepped.detach()
        return out

    def import_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Moments (and fp32 main parameters) from per-parameter tensors; a bf16 parameter
        becomes its loaded main parameter rounded, as after a step."""
        for name, param in self.named:
            stepped = self._stepped(param)
            slot = self.optimizer.state[stepped]
            for key, value in state[name].items():
                if key == MASTER:
                    with torch.no_grad():
                        if value is not stepped:
                            stepped.copy_(value)
                        param.copy_(stepped)
                elif value is not slot[key]:
                    slot[key].copy_(value)


@torch.no_grad()
def _bind_param_buffer(params: list[nn.Parameter], numel: int) -> torch.Tensor:
    """One buffer of `numel` elements holding the parameters' values back to back (zero
    padding after them); each parameter's data becomes a view of its run, so an all-gather
    into the buffer updates them all in place. The buffer is filled one parameter at a time
    as each old storage is released, so building it holds about one copy of the parameters,
    not two (start-up memory stays the shard)."""
    dtype = one_dtype({p.dtype for p in params}, "parameter")
    buffer = torch.empty(numel, dtype=dtype, device=params[0].device)
    for param, run in runs_of(buffer, params):
        run.copy_(param.detach())
        param.data = run
    buffer[sum(p.numel() for p in params) :].zero_()
    return buffer


class _FlatShard:
    """One (family, decay) group of parameters, bucket by bucket, as Megatron-Core's
    distributed optimizer lays them out. Each bucket's parameters are views of one contiguous
    parameter buffer and their gradients views of one gradient buffer (ReduceScatterBucket),
    both padded to a multiple of n; this rank owns the same 1/n slice of both.

    A bucket's master is that slice of the parameter buffer itself for fp32 parameters (no
    copy), or an fp32 copy of it for bf16 ones; its gradient is the slice of the gradient
    buffer the reduce-scatter writes (upcast when gradients reduce in bf16). After the step
    the slice is all-gathered in place into the parameter buffer. `bucket_sizes` are the
    numbers of consecutive parameters of `named` in each bucket.
    """

    def __init__(
        self,
        named: list[tuple[str, nn.Parameter]],
        bucket_sizes: list[int],
        group_name: str,
        groups: ParallelGroups,
        compressor=None,
    ) -> None:
        self.named, self.group_name = named, group_name
        self.group, self.size = groups.group(group_name), groups.size(group_name)
        self.rank = dist.get_rank(self.group)
        starts = [sum(bucket_sizes[:j]) for j in range(len(bucket_sizes) + 1)]
        self.buckets = [range(a, b) for a, b in zip(starts, starts[1:])]
        self.numels = [sum(named[i][1].numel() for i in b) for b in self.buckets]
        self.shard_numels = [-(-numel // self.size) for numel in self.numels]
        self.shard_numel = sum(self.shard_numels)
        self.param_data: list[torch.Tensor] = []
        self.param_local: list[torch.Tensor] = []  # this rank's slice of each parameter buffer
        self.masters: list[nn.Parameter] = []
        self.reducers: list[ReduceScatterBucket] = []
        for bucket, shard in zip(self.buckets, self.shard_numels):
            params = [named[i][1] for i in bucket]
            data = _bind_param_buffer(params, shard * self.size)
            local = rank_slice(data, self.rank, self.size)
            self.param_data.append(data)
            self.param_local.append(local)
            self.masters.append(nn.Parameter(local if self.aliased else local.float()))
            self.reducers.append(ReduceScatterBucket(params, group_name, groups, shard, compressor))

    @property
    def aliased(self) -> bool:
        """fp32 parameters: the masters are slices of the parameter buffers themselves."""
        return not _low_precision(self.named[0][1])

    def local_slice(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's slice of each bucket of `tensors` (one per parameter)."""
        pieces = []
        for bucket, shard in zip(self.buckets, self.shard_numels):
            flat = padded_flat([tensors[i] for i in bucket], shard * self.size)
            pieces.append(rank_slice(flat, self.rank, self.size))
        return pieces

    def full(self, local: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's `local_slice` gathered back into per-parameter tensors (collective;
        for checkpoints: a transient full copy)."""
        local_flat = torch.cat([t.reshape(-1) for t in local])
        gathered = local_flat.new_empty(self.size * self.shard_numel)
        dist.all_gather_single(gathered, local_flat, group=self.group)
        rows = gathered.view(self.size, self.shard_numel)
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.named)
        first = 0
        for bucket, numel, shard in zip(self.buckets, self.numels, self.shard_numels):
            flat = rows[:, first : first + shard].reshape(-1)[:numel]
            pieces = flat.split([self.named[i][1].numel() for i in bucket])
            for i, piece in zip(bucket, pieces):
                out[i] = piece.view_as(self.named[i][1])
            first += shard
        return out

    def attach_master_grads(self) -> None:
        """The reduced slices become the masters' gradients (fp32: views; bf16: upcast)."""
        for master, reducer in zip(self.masters, self.reducers):
            master.grad = reducer.local.float()

    def master_grads(self) -> list[torch.Tensor]:
        grads = [master.grad for master in self.masters]
        assert all(g is not None for g in grads), "master_grads() before reduce_gradients()"
        return grads  # type: ignore[return-value]

    @torch.no_grad()
    def all_gather_params(self, stats) -> None:
        """The stepped master slices into every rank's parameter buffers, in place."""
        for master, data, local in zip(self.masters, self.param_data, self.param_local):
            if not self.aliased:
                local.copy_(master)  # rounded to the parameters' dtype
            family = stats_family(self.group_name)
            stats.add(family, (self.size - 1) * local.numel() * local.element_size())
            dist.all_gather_single(data, local, group=self.group)


class ShardedAdamW:
    """ZeRO-1: optimizer state and fp32 master weights sharded over each family's group."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        groups: ParallelGroups,
        bucket_bytes: float | None = None,
        backwards_per_step: int = 1,
        compressors: dict | None = None,
    ) -> None:
        self.model, self.groups = model, groups
        compressors = compressors or {}
        _prepare_mixed_precision(model, cfg)
        named = list(model.named_parameters())
        keys = [(parameter_family(p), decays(n, p)) for n, p in named]
        plan = plan_buckets(_nbytes(named), keys, bucket_bytes or math.inf)
        self.shards: list[tuple[_FlatShard, bool]] = []
        by_key: dict[tuple[str, bool], list] = {}
        for family, group_name in REDUCE_GROUP.items():
            for with_decay in (True, False):
                mine = [b for b in plan if keys[b[0]] == (family, with_decay)]
                if mine:
                    members = [named[i] for b in mine for i in b]
                    shard = _FlatShard(
                        members,
                        [len(b) for b in mine],
                        group_name,
                        groups,
                        compressors.get(group_name),
                    )
                    self.shards.append((shard, with_decay))
                    by_key[family, with_decay] = list(shard.reducers)
        # every bucket in plan order: the order of launch on every rank
        buckets = [by_key[keys[b[0]]].pop(0) for b in plan]
        self.reducer = GradReducer(buckets, bucket_bytes is not None, backwards_per_step)
        self.optimizer = _adamw(
            [
                {"params": list(s.masters), "weight_decay": cfg.weight_decay if d else 0.0}
                for s, d in self.shards
            ],
            cfg,
        )

    def reduce_gradients(self) -> None:
        """Reduce-scatter every bucket (waits for those in flight) into the master gradients."""
        self.reducer.finish()
        for shard, _ in self.shards:
            shard.attach_master_grads()

    def grad_norm(self) -> torch.Tensor:
        """Each family's slices partition its (tp/ep-local) gradient: sum over the reduction
        group, then over the group whose shards are distinct, then over pipeline stages."""
        total = torch.zeros((), dtype=torch.float32)
        for shard, _ in self.shards:
            local = torch.stack([g.float().pow(2).sum() for g in shard.master_grads()]).sum()
            local = local.cpu()
            if shard.size > 1:
                dist.all_reduce(local, group=shard.group)
            family = parameter_family(shard.named[0][1])
            distinct = DISTINCT_GROUP[family]
            if distinct is not None and self.groups.size(distinct) > 1:
                dist.all_reduce(local, group=self.groups.group(distinct))
            total += local
        if self.groups.size("pp") > 1:
            dist.all_reduce(total, group=self.groups.group("pp"))
        return total.sqrt()

    def scale_gradients(self, factor: float) -> None:
        for shard, _ in self.shards:
            torch._foreach_mul_(shard.master_grads(), factor)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()
        for shard, _ in self.shards:
            shard.all_gather_params(self.groups.comm_stats)

    def zero_grad(self) -> None:
        """The masters' gradients dropped; the gradient buffers zeroed (the parameters'
        gradients stay views of them)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.reducer.zero_grad()

    def reduced_gradients(self) -> dict[str, torch.Tensor]:
        """Each parameter's gradient after reduce_gradients, gathered whole from the reduced
        slices (collective over every family's group; a transient full copy, for tests)."""
        out = {}
        for shard, _ in self.shards:
            for (name, _), grad in zip(shard.named, shard.full(shard.master_grads())):
                out[name] = grad
        return out

    def main_params(self) -> list[torch.Tensor]:
        """The fp32 master slices this optimizer holds apart from the parameters (bf16)."""
        return [m for s, _ in self.shards if not s.aliased for m in s.masters]

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Re-read the fp32 master slices from parameters loaded in place (init_from)."""
        for shard, _ in self.shards:
            if not shard.aliased:
                for master, local in zip(shard.masters, shard.param_local):
                    master.copy_(local)

    def state_bytes(self) -> int:
        masters = sum(m.numel() * m.element_size() for m in self.main_params())
        moments = sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        return masters + moments

    def _slots(self, shard: _FlatShard) -> list[dict]:
        slots = []
        for master in shard.masters:
            slot = self.optimizer.state[master]
            if not slot:
                slot["step"] = torch.zeros((), dtype=torch.float32)
                for key in MOMENTS:
                    slot[key] = torch.zeros_like(master)
            slots.append(slot)
        return slots

    def export_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter moments gathered from the slices (a transient full copy, for saving)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for shard, _ in self.shards:
            slots = self._slots(shard)
            keys = MOMENTS + ((MASTER,) if not shard.aliased else ())
            gathered = {
                key: shard.full(
                    [m.detach() for m in shard.masters]
                    if key == MASTER
                    else [slot[key] for slot in slots]
                )
                for key in keys
            }
            for i, (name, _) in enumerate(shard.named):
                out[name] = {
                    "step": slots[0]["step"].clone(),
                    **{key: gathered[key][i].clone() for key in keys},
                }
        return out

    def import_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Moments from per-parameter tensors. The master slices: fp32, the parameters the
        checkpoint has just loaded (the same storage); bf16, the saved fp32 masters, the bf16
        parameters becoming their rounding, as after a step (without saved masters: the
        loaded bf16 parameters)."""
        self.refresh_masters()
        for shard, _ in self.shards:
            first = shard.named[0][0]
            if MASTER in state[first] and not shard.aliased:
                masters = [state[name][MASTER] for name, _ in shard.named]
                with torch.no_grad():
                    for master, value in zip(shard.masters, shard.local_slice(masters)):
                        master.copy_(value)
                    for (_, p), value in zip(shard.named, masters):
                        p.copy_(value)
            for slot, *values in zip(
                self._slots(shard),
                *(shard.local_slice([state[n][key] for n, _ in shard.named]) for key in MOMENTS),
            ):
                for key, value in zip(MOMENTS, values):
                    slot[key].copy_(value)
                slot["step"].copy_(state[first]["step"])


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    parallel: ParallelConfig,
    groups: ParallelGroups,
    backwards_per_step: int,
):
    """ZeRO-1 or replicated AdamW; `backwards_per_step` = backward passes this rank runs per
    step (its micro-batches), after the last of which a gradient is final."""
    bucket_bytes = parallel.grad_bucket_mb * 2**20 if parallel.overlap_grad_reduce else None
    cls = ShardedAdamW if parallel.distributed_optimizer else ReplicatedAdamW
    compressors = None
    if parallel.grad_compression == "bytegrad":
        hierarchical = parallel.grad_compression_hierarchical
        node_size = parallel.grad_compression_node_size if hierarchical else 0
        names = [name for name in dict.fromkeys(REDUCE_GROUP.values()) if groups.size(name) > 1]
        compressors = build_grad_compressors(groups, names, node_size)
    return cls(model, cfg, groups, bucket_bytes, backwards_per_step, compressors)
