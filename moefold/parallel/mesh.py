"""ParallelGroups: the process groups of both folded views, built once from a ParallelLayout.

This is the only module that creates process groups. Every group family exists even when its
size is 1, so callers never branch on "is this parallel". The dense DeviceMesh (pp, dp, cp, tp)
and the expert DeviceMesh (pp, edp, ep, etp) cover the same ranks; derived multi-axis groups
(dp x cp for dense gradients, tp x cp for router statistics, ...) are built with
`new_subgroups_by_enumeration` from the layout's pure rank math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moefold.parallel.comm import CommStats
from moefold.parallel.layout import ParallelLayout

# name -> (view, axes). The names are used across the package; keep them stable.
GROUP_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "pp": ("dense", ("pp",)),
    "ep": ("expert", ("ep",)),
    "etp": ("expert", ("etp",)),
    "edp": ("expert", ("edp",)),
    "dp_cp": ("dense", ("dp", "cp")),  # dense gradients of tp-sharded weights, data order
    "tp_cp": ("dense", ("cp", "tp")),  # ranks holding parts of one micro-batch
    "dp_cp_tp": ("dense", ("dp", "cp", "tp")),  # one pipeline stage: replicated grads, metrics
    "ep_etp": ("expert", ("ep", "etp")),  # the all-gather dispatcher's token group
}


@dataclass
class ParallelGroups:
    """Process groups and coordinates of this rank in both views; passed explicitly."""

    layout: ParallelLayout
    rank: int
    dense_mesh: DeviceMesh
    expert_mesh: DeviceMesh
    groups: dict[str, dist.ProcessGroup]
    comm_stats: CommStats

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def group(self, family: str) -> dist.ProcessGroup:
        return self.groups[family]

    def size(self, family: str) -> int:
        return dist.get_world_size(self.groups[family])

    def coord(self, axis: str) -> int:
        """This rank's index along a dense (pp/dp/cp/tp) or expert (edp/ep/etp) axis."""
        if axis in self.layout.dense_coords(self.rank):
            return self.layout.dense_coords(self.rank)[axis]
        return self.layout.expert_coords(self.rank)[axis]

    def barrier(self) -> None:
        dist.barrier()


def build_parallel_groups(layout: ParallelLayout, device_type: str = "cpu") -> ParallelGroups:
    """Collective over the default process group: every rank calls it in the same order."""
    if not dist.is_initialized():
        raise RuntimeError("build_parallel_groups needs torch.distributed to be initialised")
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"layout is for {layout.world_size} ranks but the job has {dist.get_world_size()}"
        )
    rank = dist.get_rank()
    dense_mesh = DeviceMesh(
        device_type,
        torch.tensor(layout.rank_tensor("dense")),
        mesh_dim_names=("pp", "dp", "cp", "tp"),
    )
    expert_mesh = DeviceMesh(
        device_type,
        torch.tensor(layout.rank_tensor("expert")),
        mesh_dim_names=("pp", "edp", "ep", "etp"),
    )
    groups = {}
    for family, (view, axes) in GROUP_FAMILIES.items():
        groups[family] = _subgroup(layout, view, axes)
    return ParallelGroups(layout, rank, dense_mesh, expert_mesh, groups, CommStats())


def _subgroup(layout: ParallelLayout, view: str, axes: tuple[str, ...]) -> dist.ProcessGroup:
    enumeration = layout.groups(axes, view)
    if len(enumeration) == 1 and len(enumeration[0]) == dist.get_world_size():
        return dist.group.WORLD
    group, _ = dist.new_subgroups_by_enumeration(enumeration)
    return group
