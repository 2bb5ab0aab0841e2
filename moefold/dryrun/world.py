"""One rank of an N-rank job inside this process: torch's `fake` process-group backend.

Every collective on a fake group returns at once without moving data (torch ships the backend
for exactly this: tracing and memory estimation of distributed programs in one process), so
the real ParallelGroups, parallel plan, dispatchers and optimizers run unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """Default process group of `world_size` fake ranks as `rank`; destroyed on exit."""
    # Importing the module registers the "fake" backend with torch.distributed.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("dry run: this process already has a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
