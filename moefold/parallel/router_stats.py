"""Router statistics across ranks: the parallel version of model.router.LocalStatsComm.

- token_group_sum: sum over tp x cp, the ranks holding parts of the same micro-batch.
- global_prefix: over dp, global micro-batch m = j * dp + dp_rank (the data loader's
  interleaving), so at micro-step j the micro-batches of dp ranks 0..dp_rank come before ours;
  returns (their counts plus ours, the whole micro-step's counts).
No autograd: these are counts, never differentiated. Both go through parallel/comm.py, so
their bytes are in the step's `comm_bytes` (tp x cp under "tp", or "cp" when tp = 1).
"""

from __future__ import annotations

import torch
from torch import nn

from moefold.model.router import TopKRouter
from moefold.parallel.comm import all_gather_blocks, all_reduce_sum_
from moefold.parallel.mesh import ParallelGroups


class DistributedStatsComm:
    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    def token_group_sum(self, x: torch.Tensor) -> torch.Tensor:
        family = "tp" if self.groups.size("tp") > 1 else "cp"
        return all_reduce_sum_(
            x.detach().clone(),
            self.groups.group("tp_cp"),
            family=family,
            stats=self.groups.comm_stats,
        )

    def global_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dp_size = self.groups.size("dp")
        flat = all_gather_blocks(
            x.detach().contiguous().flatten(),
            self.groups.group("dp"),
            family="dp",
            stats=self.groups.comm_stats,
        )
        gathered = flat.view(dp_size, *x.shape)
        dp_rank = self.groups.coord("dp")
        return gathered[: dp_rank + 1].sum(0), gathered.sum(0)


def bind_router_stats(model: nn.Module, groups: ParallelGroups) -> None:
    comm = DistributedStatsComm(groups)
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.stats_comm = comm
