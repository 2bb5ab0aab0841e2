"""Which parameter slices each rank holds, from the real parallel plan on a meta model.

Used to check that the distinct shards of a layout add up to the model exactly: every
(parameter name, global index) any rank holds, counted once, must sum to count_parameters.
Cheap: no values, no step; one meta model per rank under the fake process group.
"""

from __future__ import annotations

from moefold.config import JobConfig
from moefold.dryrun.world import fake_process_group
from moefold.model import build_model
from moefold.parallel.apply import parallelize_model, shard_index
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups

Key = tuple[str, tuple[tuple[int, int], ...]]  # (name, ((start, stop) per dim))


def rank_shards(job: JobConfig, world_size: int, rank: int) -> dict[Key, int]:
    """(name, global index) -> element count of every parameter slice rank `rank` holds."""
    with fake_process_group(rank, world_size):
        groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
        model, _ = parallelize_model(build_model(job, device="meta"), job, groups)
        index_of = shard_index(groups)
        out = {}
        for name, param in model.named_parameters():
            index = index_of(name, param)[1]
            out[(name, tuple((s.start, s.stop) for s in index))] = param.numel()
        return out


def distinct_shard_total(job: JobConfig, world_size: int) -> tuple[int, int]:
    """(number of distinct slices, their total elements) over every rank of the job. Ranks
    with the same coordinates on every cutting axis (pp, tp, ep, etp) hold the same slices,
    so one rank of each such class is built."""
    layout = ParallelLayout.from_config(job.parallel, world_size)
    seen_coords, shards = set(), {}
    for rank in range(world_size):
        dense, expert = layout.dense_coords(rank), layout.expert_coords(rank)
        coords = (dense["pp"], dense["tp"], expert["ep"], expert["etp"])
        if coords in seen_coords:
            continue
        seen_coords.add(coords)
        shards.update(rank_shards(job, world_size, rank))
    return len(shards), sum(shards.values())


def representative_ranks(job: JobConfig, world_size: int) -> list[int]:
    """The first rank of every pipeline stage: ranks of one stage hold shards of equal sizes
    (tp, ep and etp cut evenly), so these cover every distinct memory figure."""
    layout = ParallelLayout.from_config(job.parallel, world_size)
    first: dict[int, int] = {}
    for rank in range(world_size):
        first.setdefault(layout.dense_coords(rank)["pp"], rank)
    return [first[stage] for stage in sorted(first)]


def parse_ranks(text: str | None, job: JobConfig, world_size: int) -> list[int]:
    """--ranks: all | comma-separated ranks | default (one per pipeline stage)."""
    from moefold.config import ConfigError

    if text is None:
        return representative_ranks(job, world_size)
    if text == "all":
        return list(range(world_size))
    try:
        ranks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        ranks = []
    if not ranks or not all(0 <= r < world_size for r in ranks):
        raise ConfigError(
            f"--ranks: {text!r} must be 'all' or comma-separated ranks in [0, {world_size - 1}]"
        )
    return ranks
