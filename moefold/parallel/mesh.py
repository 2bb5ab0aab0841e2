"""ParallelGroups: the process groups of both folded views, built once from a ParallelLayout.

This is the only module that creates process groups. Every group family exists even when its
size is 1, so callers never branch on "is this parallel". The dense DeviceMesh (pp, dp, cp, tp)
and the expert DeviceMesh (pp, edp, ep, etp) cover the same ranks; derived multi-axis groups
(dp x cp for dense gradients, tp x cp for router statistics, ...) are built with
`new_subgroups_by_enumeration` from the layout's pure rank math.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

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
    "world": ("dense", ("pp", "dp", "cp", "tp")),  # every rank: agreeing on a step's outcome
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


def build_parallel_groups(
    layout: ParallelLayout, device_type: str = "cpu", timeout: timedelta | None = None
) -> ParallelGroups:
    """Collective over the default process group: every rank calls it in the same order.

    `timeout` (parallel.timeout_s) bounds the collectives of the derived groups; torch would
    give each new group its backend's default (30 min on gloo), not the default group's. The
    DeviceMeshes' own groups carry no collectives (DTensor views for DCP only).
    """
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
        groups[family] = _enumerated(layout.groups(axes, view), timeout)
    return ParallelGroups(layout, rank, dense_mesh, expert_mesh, groups, CommStats())


def build_node_groups(
    groups: ParallelGroups, family: str, node_size: int
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Split this rank's `family` group (e.g. "dp_cp") by node, for hierarchical reductions.

    Nodes hold `node_size` consecutive global ranks (the launcher's order). Returns (the
    group's members on this rank's node, the members at the same position on every node).
    Collective over the default group: every rank calls it with the same arguments.
    """
    view, axes = GROUP_FAMILIES[family]
    inside, across = [], []
    for members in groups.layout.groups(axes, view):
        by_node: dict[int, list[int]] = {}
        for rank in sorted(members):
            by_node.setdefault(rank // node_size, []).append(rank)
        parts = list(by_node.values())
        if len({len(part) for part in parts}) != 1:
            raise ValueError(
                f"parallel.grad_compression_node_size={node_size}: the {family} group "
                f"{sorted(members)} has unequal numbers of ranks on its nodes; pick a node "
                "size that splits every data-parallel group evenly, or turn off "
                "parallel.grad_compression_hierarchical"
            )
        inside += parts
        across += [list(column) for column in zip(*parts)]
    return _enumerated(inside), _enumerated(across)


def _enumerated(
    enumeration: list[list[int]], timeout: timedelta | None = None
) -> dist.ProcessGroup:
    if len(enumeration) == 1 and len(enumeration[0]) == dist.get_world_size():
        world = dist.group.WORLD
        assert world is not None, "the default process group is not initialised"
        return world
    group, _ = dist.new_subgroups_by_enumeration(enumeration, timeout=timeout)
    assert group is not None, "this rank is in no group of the enumeration"
    return group


def _subgroup(layout: ParallelLayout, view: str, axes: tuple[str, ...]) -> dist.ProcessGroup:
    return _enumerated(layout.groups(axes, view))
