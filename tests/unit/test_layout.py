"""ParallelLayout: rank math of the folded dense and expert views, with no process groups.

The reference here is written from the rule itself, not from layout.py: rank r has the
coordinates of the r-th entry of the row-major (outermost axis first) enumeration of the view's
shape, and a group of axes is the set of ranks that agree on every other axis.
"""

import ast
import functools
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moefold.config import ConfigError, ParallelConfig
from moefold.parallel.layout import ParallelLayout

REPO = Path(__file__).resolve().parents[2]
LAYOUT_SOURCE = REPO / "moefold" / "parallel" / "layout.py"
VIEWS = ("dense", "expert")
AXES = {"dense": ("pp", "dp", "cp", "tp"), "expert": ("pp", "edp", "ep", "etp")}
# Every non-empty subset of the four axes of a view, as positions (0 = pp ... 3 = innermost).
FAMILIES = [dims for k in range(1, 5) for dims in itertools.combinations(range(4), k)]
# The groups the framework reduces over (docs/parallel_layout.md): dense grads dp x cp, router
# statistics tp x cp, global statistics dp x cp x tp, expert grads edp, expert token group ep x etp.
REDUCTION_FAMILIES = [("dense", (1, 2)), ("dense", (2, 3)), ("dense", (1, 2, 3))]
REDUCTION_FAMILIES += [("expert", (1,)), ("expert", (2, 3))]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _factorizations(world_size: int):
    """Every (tp, cp, pp, ep, etp) whose dense and expert products divide world_size."""
    for pp in _divisors(world_size):
        stage = world_size // pp
        for cp, ep in itertools.product(_divisors(stage), repeat=2):
            for tp, etp in itertools.product(_divisors(stage // cp), _divisors(stage // ep)):
                yield {"tp": tp, "cp": cp, "pp": pp, "ep": ep, "etp": etp}


@functools.cache
def _reference_coords(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    coords = list(itertools.product(*(range(size) for size in shape)))
    for rank, (a, b, c, d) in enumerate(coords):  # the formula of docs/parallel_layout.md
        assert rank == ((a * shape[1] + b) * shape[2] + c) * shape[3] + d
    return coords


@functools.cache
def _reference_groups(shape: tuple[int, ...], dims: tuple[int, ...]) -> list[list[int]]:
    by_fixed = {}
    for rank, index in enumerate(_reference_coords(shape)):
        fixed = tuple(i for dim, i in enumerate(index) if dim not in dims)
        by_fixed.setdefault(fixed, []).append(rank)
    groups = sorted(by_fixed.values())
    flat = sorted(rank for group in groups for rank in group)
    assert flat == list(range(math.prod(shape))), "every rank in exactly one group"
    assert all(len(group) == math.prod(shape[dim] for dim in dims) for group in groups)
    return groups


def _flatten(nested) -> list[int]:
    return [x for item in nested for x in _flatten(item)] if isinstance(nested, list) else [nested]


def _nested_shape(nested) -> tuple[int, ...]:
    return (len(nested), *_nested_shape(nested[0])) if isinstance(nested, list) else ()


def _check_view(layout: ParallelLayout, view: str) -> None:
    """One view in full: coordinates of every rank both ways, every group family, group_of."""
    axes, shape, world = AXES[view], layout.shape(view), layout.world_size
    assert layout.axes(view) == axes
    assert math.prod(shape) == world
    for rank, index in enumerate(_reference_coords(shape)):
        coords = layout.coords(rank, view)
        assert coords == dict(zip(axes, index, strict=True))
        assert layout.rank_at(coords, view) == rank
    for dims in FAMILIES:
        names = tuple(axes[dim] for dim in dims)
        groups = layout.groups(names, view)
        assert groups == _reference_groups(shape, dims), (layout.label, view, names)
        assert layout.group_of(groups[0][-1], names, view) == groups[0]
        assert layout.group_of(groups[-1][len(groups[-1]) // 2], names, view) == groups[-1]
    tensor = layout.rank_tensor(view)
    assert _nested_shape(tensor) == shape
    assert _flatten(tensor) == list(range(world))


def _check_folding(layout: ParallelLayout) -> None:
    """What ties the two views together: sizes, pp groups and stages, the reduction groups."""
    world = layout.world_size
    assert layout.dense_shape == (layout.pp, layout.dp, layout.cp, layout.tp)
    assert layout.expert_shape == (layout.pp, layout.edp, layout.ep, layout.etp)
    assert layout.dp * layout.pp * layout.cp * layout.tp == world
    assert layout.edp * layout.pp * layout.ep * layout.etp == world
    assert layout.groups(("pp",), "dense") == layout.groups(("pp",), "expert")
    stages = [layout.stage_ranks(pp_rank) for pp_rank in range(layout.pp)]
    assert stages == _reference_groups(layout.dense_shape, (1, 2, 3))
    assert stages == _reference_groups(layout.expert_shape, (1, 2, 3))
    for view, dims in REDUCTION_FAMILIES:
        names = tuple(AXES[view][dim] for dim in dims)
        assert layout.groups(names, view) == _reference_groups(layout.shape(view), dims)


def _check_layout(layout: ParallelLayout) -> None:
    _check_folding(layout)
    for view in VIEWS:
        _check_view(layout, view)


@pytest.mark.parametrize("world_size", range(1, 65), ids=lambda w: f"w{w}")
def test_every_factorization_partitions_ranks_in_both_views(world_size):
    """Every layout gets the cross-view checks. A view is a function of its own shape only, so
    each distinct (view, shape) gets the full per-rank check once; a view that leaked the other
    view's degrees would still fail the per-layout REDUCTION_FAMILIES comparison."""
    checked = set()
    for degrees in _factorizations(world_size):
        layout = ParallelLayout.build(world_size, **degrees)
        _check_folding(layout)
        for view in VIEWS:
            if (view, layout.shape(view)) not in checked:
                checked.add((view, layout.shape(view)))
                _check_view(layout, view)


@pytest.mark.parametrize("world_size", [6, 8], ids=lambda w: f"w{w}")
def test_build_accepts_exactly_the_factorizations(world_size):
    """Brute force over all degrees 1..world_size+1; also checks _factorizations itself."""
    accepted = set()
    for tp, cp, pp, ep, etp in itertools.product(range(1, world_size + 2), repeat=5):
        legal = world_size % (pp * cp * tp) == 0 and world_size % (pp * ep * etp) == 0
        try:
            ParallelLayout.build(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
            accepted.add((tp, cp, pp, ep, etp))
        except ConfigError:
            assert not legal, (tp, cp, pp, ep, etp)
        else:
            assert legal, (tp, cp, pp, ep, etp)
    assert accepted == {tuple(degrees.values()) for degrees in _factorizations(world_size)}


@pytest.mark.parametrize(
    "degrees",
    [
        {"pp": 8, "tp": 2, "cp": 2, "ep": 8, "etp": 1},
        {"pp": 4, "tp": 8, "ep": 32},
        {"tp": 8, "cp": 4, "ep": 64, "etp": 2},
        {"pp": 16, "tp": 4, "cp": 2, "ep": 16, "etp": 4},
        {"pp": 2, "tp": 1, "cp": 16, "ep": 1, "etp": 8},
    ],
    ids=lambda d: ParallelLayout.build(1024, **d).label,
)
def test_spot_checks_at_1024_ranks(degrees):
    _check_layout(ParallelLayout.build(1024, **degrees))


def test_pp8_tp2_cp2_ep8_at_1024_ranks_by_hand():
    layout = ParallelLayout.build(1024, pp=8, tp=2, cp=2, ep=8)
    assert layout.dense_shape == (8, 32, 2, 2)
    assert layout.expert_shape == (8, 16, 8, 1)
    assert layout.stage_ranks(7) == list(range(896, 1024))
    assert layout.dense_coords(1023) == {"pp": 7, "dp": 31, "cp": 1, "tp": 1}
    assert layout.expert_coords(1023) == {"pp": 7, "edp": 15, "ep": 7, "etp": 0}
    assert layout.group_of(130, ("ep",), "expert") == list(range(128, 136))
    assert layout.group_of(130, ("dp", "cp"), "dense") == list(range(128, 256, 2))
    assert layout.group_of(130, ("edp",), "expert") == list(range(130, 256, 8))
    assert layout.group_of(130, ("pp",), "dense") == list(range(2, 1024, 128))


# ---- hand-worked folded layouts (docs/parallel_layout.md shows the same tables) -----------------


def test_w8_cp2_tp2_dp2_with_ep8_spans_tp_cp_dp():
    layout = ParallelLayout.build(8, tp=2, cp=2, ep=8)
    assert (layout.dp, layout.edp) == (2, 1)
    assert layout.groups(("tp",), "dense") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups(("cp",), "dense") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups(("dp",), "dense") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups(("ep",), "expert") == [list(range(8))]
    assert layout.groups(("ep",), "expert") == layout.groups(("dp", "cp", "tp"), "dense")
    assert layout.groups(("edp",), "expert") == [[r] for r in range(8)]
    assert layout.expert_coords(6) == {"pp": 0, "edp": 0, "ep": 6, "etp": 0}
    assert layout.dense_coords(6) == {"pp": 0, "dp": 1, "cp": 1, "tp": 0}


def test_w16_pp2_cp2_tp2_with_ep4_folds_ep_onto_tp_cp():
    layout = ParallelLayout.build(16, pp=2, tp=2, cp=2, ep=4)
    assert layout.dense_shape == (2, 2, 2, 2)
    assert layout.expert_shape == (2, 2, 4, 1)
    tp_cp = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert layout.groups(("tp", "cp"), "dense") == tp_cp
    assert layout.groups(("ep",), "expert") == tp_cp
    dp = [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert layout.groups(("dp",), "dense") == dp
    assert layout.groups(("edp",), "expert") == dp
    assert layout.groups(("pp",), "expert") == [[r, r + 8] for r in range(8)]
    assert layout.stage_ranks(1) == list(range(8, 16))


def test_w8_tp2_dp4_with_ep4_has_edp2():
    layout = ParallelLayout.build(8, tp=2, ep=4)
    assert (layout.dp, layout.edp) == (4, 2)
    assert layout.groups(("tp",), "dense") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups(("dp",), "dense") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.groups(("ep",), "expert") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.groups(("edp",), "expert") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups(("etp",), "expert") == [[r] for r in range(8)]


def test_w8_pp2_tp2_dp2_with_ep2_etp2_folds_etp_onto_tp_and_ep_onto_dp():
    layout = ParallelLayout.build(8, pp=2, tp=2, ep=2, etp=2)
    assert layout.dense_shape == (2, 2, 1, 2)
    assert layout.expert_shape == (2, 1, 2, 2)
    tp = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups(("tp",), "dense") == tp
    assert layout.groups(("etp",), "expert") == tp
    assert layout.groups(("dp",), "dense") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups(("ep",), "expert") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups(("edp",), "expert") == [[r] for r in range(8)]


def test_w8_cp2_tp2_dp2_with_ep2_etp2_folds_ep_onto_cp_and_edp_onto_dp():
    layout = ParallelLayout.build(8, tp=2, cp=2, ep=2, etp=2)
    assert (layout.dp, layout.edp) == (2, 2)
    assert layout.groups(("etp",), "expert") == layout.groups(("tp",), "dense")
    assert layout.groups(("ep",), "expert") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups(("ep",), "expert") == layout.groups(("cp",), "dense")
    assert layout.groups(("edp",), "expert") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups(("edp",), "expert") == layout.groups(("dp",), "dense")


def test_rank_tensor_nests_outermost_axis_first():
    layout = ParallelLayout.build(8, pp=2, tp=2, ep=4)
    assert layout.rank_tensor("dense") == [[[[0, 1]], [[2, 3]]], [[[4, 5]], [[6, 7]]]]
    assert layout.rank_tensor("expert") == [[[[0], [1], [2], [3]]], [[[4], [5], [6], [7]]]]


def test_empty_axes_give_one_group_per_rank():
    layout = ParallelLayout.build(4, tp=2, ep=4)
    assert layout.groups((), "dense") == [[0], [1], [2], [3]]
    assert layout.group_of(3, (), "expert") == [3]


# ---- construction and errors ----------------------------------------------------------------


def test_from_config_matches_build():
    cfg = ParallelConfig(tp=2, cp=2, pp=2, ep=4, etp=1, vpp=2, pp_schedule="interleaved_1f1b")
    assert ParallelLayout.from_config(cfg, 16) == ParallelLayout.build(16, tp=2, cp=2, pp=2, ep=4)


def test_layout_is_frozen():
    layout = ParallelLayout.build(8, tp=2)
    with pytest.raises(AttributeError):
        layout.tp = 4


@pytest.mark.parametrize(
    "world_size, degrees, message",
    [
        (8, {"pp": 3}, "parallel.pp: pp=3 does not divide world_size=8; use pp=2 or pp=4"),
        (8, {"pp": 2, "cp": 3}, "parallel.cp: cp=3 does not divide the 4 ranks of one stage"),
        (8, {"cp": 2, "tp": 8}, "parallel.tp: tp=8 does not divide the 4 ranks left by"),
        (
            12,
            {"tp": 5},
            "parallel.tp: tp=5 does not divide the 12 ranks left by world_size=12 / (pp=1 * cp=1);"
            " use tp=4 or tp=6",
        ),
        (8, {"pp": 2, "ep": 8}, "parallel.ep: ep=8 does not divide the 4 ranks of one stage"),
        (8, {"ep": 4, "etp": 4}, "parallel.etp: etp=4 does not divide the 2 ranks left by"),
        (8, {"ep": 3}, "or a world size that is a multiple of 3"),
        (8, {"tp": 0}, "parallel.tp: must be >= 1"),
        (0, {}, "world_size: must be >= 1"),
    ],
)
def test_bad_degrees_name_the_field_and_a_legal_value(world_size, degrees, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ParallelLayout.build(world_size, **degrees)


def test_bad_arguments_raise_value_error():
    layout = ParallelLayout.build(4, tp=2)
    with pytest.raises(ValueError, match="view must be 'dense' or 'expert'"):
        layout.groups(("tp",), "attention")
    with pytest.raises(ValueError, match="unknown axes"):
        layout.groups(("ep",), "dense")
    with pytest.raises(ValueError, match="tuple of axis names"):
        layout.groups("tp", "dense")
    with pytest.raises(ValueError, match="rank 4 is outside"):
        layout.dense_coords(4)
    with pytest.raises(ValueError, match="pp_rank 1 is outside"):
        layout.stage_ranks(1)
    with pytest.raises(ValueError, match="must name exactly"):
        layout.rank_at({"tp": 0}, "dense")


# ---- text -------------------------------------------------------------------------------------


def test_describe_shows_both_views_and_groups():
    text = ParallelLayout.build(8, tp=2, ep=4).describe()
    assert text.splitlines()[0] == "tp2-dp4__ep4-edp2 (world_size=8)"
    assert "  dense  (pp, dp, cp, tp)   = (1, 4, 1, 2)" in text
    assert "  expert (pp, edp, ep, etp) = (1, 2, 4, 1)" in text
    assert "   5 |  0 |  2  0  1 |   1  1   0" in text
    assert "  expert edp           [0, 4] [1, 5] [2, 6] [3, 7]" in text


def test_describe_truncates_large_worlds():
    text = ParallelLayout.build(1024, pp=8, tp=2, cp=2, ep=8).describe(max_ranks=16)
    assert "... (1008 more ranks)" in text
    assert "  dense  dp x cp x tp  [0, 1, 2, ..., 127] (128 ranks) ... (+7 groups)" in text
    assert len(text.splitlines()) < 40


@pytest.mark.parametrize(
    "world_size, degrees",
    [
        (8, {"tp": 2, "cp": 2, "ep": 8}),
        (8, {"tp": 2, "ep": 4}),
        (16, {"pp": 2, "tp": 2, "cp": 2, "ep": 4}),
    ],
    ids=["tp2-cp2-dp2__ep8", "tp2-dp4__ep4-edp2", "pp2-tp2-cp2-dp2__ep4-edp2"],
)
def test_docs_tables_match_describe(world_size, degrees):
    docs = (REPO / "docs" / "parallel_layout.md").read_text()
    assert ParallelLayout.build(world_size, **degrees).describe() in docs


# ---- import rule ------------------------------------------------------------------------------


def test_layout_imports_only_stdlib_and_config():
    tree = ast.parse(LAYOUT_SOURCE.read_text())
    modules = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    modules += [
        "." * node.level + (node.module or "")
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    ]
    assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in modules)
    allowed = set(sys.stdlib_module_names) | {"moefold.config"}
    assert [m for m in modules if m not in allowed and m.split(".")[0] not in allowed] == []


def test_importing_layout_loads_no_torch():
    code = "import sys, moefold.parallel.layout; print([m for m in sys.modules if 'torch' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
