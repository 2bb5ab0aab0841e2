"""Token dispatchers; `build_dispatcher` is the one place that picks an implementation."""

from __future__ import annotations

from moefold.config import MoEConfig
from moefold.dispatch.local import LocalDispatcher


def build_dispatcher(cfg: MoEConfig, groups) -> object:
    """LocalDispatcher when ep = etp = 1, else the configured `moe.dispatcher` on `groups`
    (a moefold.parallel.mesh.ParallelGroups), de-duplicated when `moe.dedup` is set."""
    if groups.size("ep_etp") == 1:
        return LocalDispatcher(cfg)
    if cfg.dispatcher == "allgather":
        from moefold.dispatch.all_gather import AllGatherDispatcher

        return AllGatherDispatcher(
            cfg, groups.group("ep_etp"), groups.coord("ep"), groups.size("ep"), groups.comm_stats
        )
    if cfg.dedup:
        from moefold.dispatch.dedup import DedupAllToAllDispatcher

        return DedupAllToAllDispatcher(
            cfg, groups.group("ep"), groups.group("etp"), groups.comm_stats
        )
    from moefold.dispatch.all_to_all import AllToAllDispatcher

    return AllToAllDispatcher(cfg, groups.group("ep"), groups.group("etp"), groups.comm_stats)
