"""Pure rank math for MoE Parallel Folding: the dense and expert views of one set of ranks.

Attention and dense layers see the world as ``pp x dp x cp x tp``; MoE layers see the same ranks as
``pp x edp x ep x etp``. ``tp, cp, pp, ep, etp`` are configured, ``dp`` and ``edp`` are derived.
Axes are listed outermost to innermost, the way a DeviceMesh shape or a tensor reshape reads, so
the innermost axis gets consecutive ranks:

    dense:  rank = ((pp_rank * dp  + dp_rank)  * cp + cp_rank) * tp  + tp_rank
    expert: rank = ((pp_rank * edp + edp_rank) * ep + ep_rank) * etp + etp_rank

pp is outermost in both views, so each pipeline stage is one contiguous block of ranks and both
views have the same pp groups. This module imports only ``moefold.config`` (never
``torch.distributed``); ``parallel/mesh.py`` turns a layout into DeviceMeshes and process groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from moefold.config import ConfigError, ParallelConfig

View = Literal["dense", "expert"]

# Group families printed by describe(): (view, axes). Innermost first, so groups grow down the list.
_DESCRIBED_GROUPS: tuple[tuple[View, tuple[str, ...]], ...] = (
    ("dense", ("tp",)),
    ("dense", ("cp",)),
    ("dense", ("dp",)),
    ("dense", ("tp", "cp")),
    ("dense", ("dp", "cp")),
    ("dense", ("dp", "cp", "tp")),
    ("expert", ("etp",)),
    ("expert", ("ep",)),
    ("expert", ("edp",)),
    ("expert", ("ep", "etp")),
)


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """The dense (pp, dp, cp, tp) and expert (pp, edp, ep, etp) views of `world_size` ranks.

    Build with `ParallelLayout.build(...)` or `ParallelLayout.from_config(...)`; construction
    validates the degrees and raises `ConfigError` naming the field and a legal alternative.
    """

    world_size: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1

    DENSE_AXES: ClassVar[tuple[str, ...]] = ("pp", "dp", "cp", "tp")
    EXPERT_AXES: ClassVar[tuple[str, ...]] = ("pp", "edp", "ep", "etp")

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size: must be >= 1, got {self.world_size}")
        for name in ("tp", "cp", "pp", "ep", "etp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        world, pp, cp, ep = self.world_size, self.pp, self.cp, self.ep
        legal_world = math.lcm(pp * cp * self.tp, pp * ep * self.etp)
        _check_divides("pp", pp, world, f"world_size={world}", legal_world)
        stage = world // pp
        per_stage = f"the {stage} ranks of one stage (world_size={world} / pp={pp})"
        _check_divides("cp", cp, stage, per_stage, legal_world)
        left = f"the {stage // cp} ranks left by world_size={world} / (pp={pp} * cp={cp})"
        _check_divides("tp", self.tp, stage // cp, left, legal_world)
        _check_divides("ep", ep, stage, per_stage, legal_world)
        left = f"the {stage // ep} ranks left by world_size={world} / (pp={pp} * ep={ep})"
        _check_divides("etp", self.etp, stage // ep, left, legal_world)
        # Holds by construction (pp is outermost in both views); Megatron asserts the same.
        assert self.groups(("pp",), "dense") == self.groups(("pp",), "expert")

    @classmethod
    def build(
        cls, world_size: int, *, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1
    ) -> ParallelLayout:
        """Validate the degrees and return the layout; dp and edp are derived from `world_size`."""
        return cls(world_size=world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)

    @classmethod
    def from_config(cls, parallel_cfg: ParallelConfig, world_size: int) -> ParallelLayout:
        """The layout of `parallel_cfg` on `world_size` ranks (vpp does not change rank math)."""
        c = parallel_cfg
        return cls.build(world_size, tp=c.tp, cp=c.cp, pp=c.pp, ep=c.ep, etp=c.etp)

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Dense data-parallel size, world_size / (pp * cp * tp)."""
        return self.world_size // (self.pp * self.cp * self.tp)

    @property
    def edp(self) -> int:
        """Expert data-parallel size, world_size / (pp * ep * etp)."""
        return self.world_size // (self.pp * self.ep * self.etp)

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        """Sizes of DENSE_AXES: (pp, dp, cp, tp)."""
        return (self.pp, self.dp, self.cp, self.tp)

    @property
    def expert_shape(self) -> tuple[int, int, int, int]:
        """Sizes of EXPERT_AXES: (pp, edp, ep, etp)."""
        return (self.pp, self.edp, self.ep, self.etp)

    @property
    def label(self) -> str:
        """Short id for logs and test ids, e.g. 'pp2-tp2-dp2__ep4' (size-1 axes left out)."""
        dense = [("pp", self.pp), ("tp", self.tp), ("cp", self.cp), ("dp", self.dp)]
        expert = [("ep", self.ep), ("etp", self.etp), ("edp", self.edp)]
        dense_text = "-".join(f"{name}{size}" for name, size in dense if size > 1) or "dp1"
        expert_text = "-".join(f"{name}{size}" for name, size in expert if size > 1) or "ep1"
        return f"{dense_text}__{expert_text}"

    def axes(self, view: View) -> tuple[str, ...]:
        """DENSE_AXES or EXPERT_AXES."""
        return self._view(view)[0]

    def shape(self, view: View) -> tuple[int, ...]:
        """dense_shape or expert_shape."""
        return self._view(view)[1]

    # ---- coordinates -------------------------------------------------------------------------

    def coords(self, rank: int, view: View) -> dict[str, int]:
        """Axis name -> index of `rank` in `view`, outermost axis first."""
        names, shape = self._view(view)
        self._check_rank(rank)
        index = {}
        for name, size in zip(reversed(names), reversed(shape), strict=True):
            rank, index[name] = divmod(rank, size)
        return {name: index[name] for name in names}

    def dense_coords(self, rank: int) -> dict[str, int]:
        """{'pp', 'dp', 'cp', 'tp'} -> index of `rank`."""
        return self.coords(rank, "dense")

    def expert_coords(self, rank: int) -> dict[str, int]:
        """{'pp', 'edp', 'ep', 'etp'} -> index of `rank`."""
        return self.coords(rank, "expert")

    def rank_at(self, coords: dict[str, int], view: View) -> int:
        """The rank at `coords` (one index per axis of `view`); inverse of `coords`."""
        names, shape = self._view(view)
        if set(coords) != set(names):
            raise ValueError(f"coords must name exactly the {view} axes {names}, got {coords}")
        rank = 0
        for name, size in zip(names, shape, strict=True):
            if not 0 <= coords[name] < size:
                raise ValueError(f"{name} index {coords[name]} is outside [0, {size})")
            rank = rank * size + coords[name]
        return rank

    # ---- groups ------------------------------------------------------------------------------

    def groups(self, axes: Sequence[str], view: View) -> list[list[int]]:
        """Every group of ranks that varies over exactly `axes`, all other axes of `view` fixed.

        Example: groups(("dp", "cp"), "dense") are the dense gradient-reduction groups.
        Each group is a sorted list; groups are ordered by their lowest rank and together hold
        every rank exactly once. An empty `axes` gives one group per rank.
        """
        names, shape = self._view(view)
        varying = self._axis_dims(axes, names)
        fixed = [dim for dim in range(len(names)) if dim not in varying]
        strides = _strides(shape)
        offsets = _span(varying, shape, strides)
        return [[base + offset for offset in offsets] for base in _span(fixed, shape, strides)]

    def group_of(self, rank: int, axes: Sequence[str], view: View) -> list[int]:
        """The group of groups(axes, view) that contains `rank`."""
        names, shape = self._view(view)
        varying = self._axis_dims(axes, names)
        self._check_rank(rank)
        strides = _strides(shape)
        # The group's lowest rank: `rank` with its index along every varying axis set to 0.
        base = rank - sum(rank // strides[dim] % shape[dim] * strides[dim] for dim in varying)
        return [base + offset for offset in _span(varying, shape, strides)]

    def stage_ranks(self, pp_rank: int) -> list[int]:
        """All ranks of pipeline stage `pp_rank` (a contiguous block, the same in both views)."""
        if not 0 <= pp_rank < self.pp:
            raise ValueError(f"pp_rank {pp_rank} is outside [0, {self.pp})")
        stage_size = self.world_size // self.pp
        return list(range(pp_rank * stage_size, (pp_rank + 1) * stage_size))

    def rank_tensor(self, view: View) -> list:
        """Ranks as nested lists shaped like `view`, e.g. for DeviceMesh(device, mesh=...)."""
        nested: list = list(range(self.world_size))
        for size in reversed(self.shape(view)[1:]):
            nested = [nested[start : start + size] for start in range(0, len(nested), size)]
        return nested

    # ---- text --------------------------------------------------------------------------------

    def describe(self, max_ranks: int = 64) -> str:
        """Both views as a per-rank table plus the main group families, for logs and docs.

        At most `max_ranks` table rows are printed, and each group line stops after about
        `max_ranks` ranks; what is left out is counted.
        """
        lines = [
            f"{self.label} (world_size={self.world_size})",
            "  dense  (pp, dp, cp, tp)   = ({}, {}, {}, {})".format(*self.dense_shape),
            "  expert (pp, edp, ep, etp) = ({}, {}, {}, {})".format(*self.expert_shape),
            "",
            *self._rank_table(max_ranks),
            "",
            "groups (ranks varying over the named axes, all other axes fixed):",
            _group_line("pp", self.groups(("pp",), "dense"), max_ranks),
        ]
        for view, axes in _DESCRIBED_GROUPS:
            lines.append(
                _group_line(f"{view:<6} {' x '.join(axes)}", self.groups(axes, view), max_ranks)
            )
        return "\n".join(lines)

    def _rank_table(self, max_ranks: int) -> list[str]:
        columns = [("rank", self.world_size)]
        columns += zip(self.DENSE_AXES, self.dense_shape, strict=True)
        columns += list(zip(self.EXPERT_AXES, self.expert_shape, strict=True))[1:]
        widths = [max(len(name), len(str(size - 1))) for name, size in columns]
        blocks = [(0, 1), (1, 2), (2, 5), (5, 8)]  # rank | pp | dp cp tp | edp ep etp

        def row(cells: list[str]) -> str:
            padded = [cell.rjust(width) for cell, width in zip(cells, widths, strict=True)]
            return " | ".join(" ".join(padded[start:stop]) for start, stop in blocks)

        header = row([name for name, _ in columns])
        rule = "-+-".join("-" * len(part) for part in header.split(" | "))
        lines = [header, rule]
        for rank in range(min(self.world_size, max_ranks)):
            dense, expert = self.dense_coords(rank), self.expert_coords(rank)
            cells = [rank, *dense.values(), expert["edp"], expert["ep"], expert["etp"]]
            lines.append(row([str(c) for c in cells]))
        if self.world_size > max_ranks:
            lines.append(f"... ({self.world_size - max_ranks} more ranks)")
        return lines

    # ---- checks ------------------------------------------------------------------------------

    def _view(self, view: View) -> tuple[tuple[str, ...], tuple[int, ...]]:
        if view == "dense":
            return self.DENSE_AXES, self.dense_shape
        if view == "expert":
            return self.EXPERT_AXES, self.expert_shape
        raise ValueError(f"view must be 'dense' or 'expert', got {view!r}")

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")

    @staticmethod
    def _axis_dims(axes: Sequence[str], names: tuple[str, ...]) -> list[int]:
        if isinstance(axes, str):
            raise ValueError(f"axes must be a tuple of axis names, e.g. ({axes!r},), got {axes!r}")
        unknown = [axis for axis in axes if axis not in names]
        if unknown:
            raise ValueError(f"unknown axes {unknown} for this view; its axes are {names}")
        return [dim for dim, name in enumerate(names) if name in axes]


def _strides(shape: Sequence[int]) -> list[int]:
    """Rank distance between neighbours along each axis (row-major, innermost stride 1)."""
    strides = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    return strides


def _span(dims: Iterable[int], shape: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Ranks reached from rank 0 by moving along `dims` only; ascending (row-major order)."""
    offsets = [0]
    for dim in sorted(dims):  # outer axes vary slowest, so the result stays sorted
        steps = range(0, shape[dim] * strides[dim], strides[dim])
        offsets = [offset + step for offset in offsets for step in steps]
    return offsets


def _check_divides(name: str, value: int, ranks: int, what: str, legal_world: int) -> None:
    """Raise ConfigError for parallel.<name> unless `value` divides `ranks`; suggest neighbours."""
    if ranks % value == 0:
        return
    divisors = [d for d in range(1, ranks + 1) if ranks % d == 0]
    below = max(d for d in divisors if d < value)
    above = [d for d in divisors if d > value][:1]
    options = " or ".join(f"{name}={d}" for d in [below, *above])
    raise ConfigError(
        f"parallel.{name}: {name}={value} does not divide {what}; use {options}, "
        f"or a world size that is a multiple of {legal_world}"
    )


def _group_line(title: str, groups: list[list[int]], max_ranks: int) -> str:
    shown: list[list[int]] = []
    count = 0
    for group in groups:
        if shown and count + len(group) > max_ranks:
            break
        shown.append(_group_text(group))
        count += len(group)
    more = f" ... (+{len(groups) - len(shown)} groups)" if len(shown) < len(groups) else ""
    return f"  {title:<20} {' '.join(shown)}{more}"


def _group_text(group: list[int]) -> str:
    """'[0, 1]', or '[0, 4, 8, ..., 124] (32 ranks)' for a group of more than 16 ranks."""
    if len(group) <= 16:
        return "[" + ", ".join(map(str, group)) + "]"
    head = ", ".join(map(str, group[:3]))
    return f"[{head}, ..., {group[-1]}] ({len(group)} ranks)"
