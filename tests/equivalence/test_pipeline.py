"""Pipeline parallelism (1F1B, interleaved, GPipe), alone and in all-five-dimension folded
layouts, equals the single process: losses and gradients, so a gradient that is a constant
factor off cannot hide behind a matching printed loss."""

import pytest

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference

FOUR_LAYERS = ("model.layers=4",)

LAYOUTS = {
    "pp2-1f1b": (2, {"pp": 2}, ()),
    "pp2-gpipe": (2, {"pp": 2, "pp_schedule": "gpipe"}, ()),
    "pp2-uneven-1-2": (
        2,
        {"pp": 2, "pp_first_stage_layers": 1, "pp_last_stage_layers": 2},
        ("model.layers=3",),
    ),
    "pp4-uneven-1-2-2-1": (
        4,
        {"pp": 4, "pp_first_stage_layers": 1, "pp_last_stage_layers": 1},
        ("model.layers=6",),
    ),
    "pp4-1f1b": (4, {"pp": 4}, FOUR_LAYERS),
    "pp2-vpp2-interleaved": (
        2,
        {"pp": 2, "vpp": 2, "pp_schedule": "interleaved_1f1b"},
        FOUR_LAYERS,
    ),
    "pp2-dp2__pp2-ep2": (4, {"pp": 2, "ep": 2}, ()),
    "pp2-tp2-cp2__pp2-ep4": (8, {"pp": 2, "tp": 2, "cp": 2, "ep": 4}, ()),
    "pp2-cp2-dp2__pp2-ep2-etp2": (8, {"pp": 2, "cp": 2, "ep": 2, "etp": 2}, ()),
    "pp2-tp2-dp2__pp2-ep4": (8, {"pp": 2, "tp": 2, "ep": 4}, ()),
    "pp2-vpp2-tp2-dp2__pp2-ep4-allgather": (
        8,
        {
            "pp": 2,
            "vpp": 2,
            "pp_schedule": "interleaved_1f1b",
            "tp": 2,
            "ep": 4,
            "dispatcher": "allgather",
        },
        FOUR_LAYERS,
    ),
    "pp2-tp2__pp2-ep2-global_aux": (4, {"pp": 2, "tp": 2, "ep": 2}, ("moe.aux_loss=global_aux",)),
    "pp2-dp2__pp2-ep2-seq_aux-bias": (
        4,
        {"pp": 2, "ep": 2},
        ("moe.aux_loss=seq_aux", "moe.expert_bias=true"),
    ),
    "pp2-dp2__pp2-ep2-cf1-padded": (
        4,
        {"pp": 2, "ep": 2},
        ("moe.capacity_factor=1.0", "moe.pad_to_capacity=true"),
    ),
    "pp2-cp2__pp2-ep4-cf1-position": (
        8,
        {"pp": 2, "cp": 2, "ep": 4},
        ("moe.capacity_factor=1.0", "moe.drop_policy=position"),
    ),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_pipeline_layout_matches_single_process(layout):
    world_size, parallel, model_overrides = LAYOUTS[layout]
    result = run_ranks(layout_body, world_size, model_overrides, parallel, timeout=900)[0]
    if parallel.get("cp", 1) > 1 and any("capacity_factor" in o for o in model_overrides):
        # cp ranks drop on their own sequence chunks: compare with the same layout without pp.
        no_pp = {k: v for k, v in parallel.items() if k not in ("pp", "vpp", "pp_schedule")}
        ref = run_ranks(layout_body, world_size // 2, model_overrides, no_pp, timeout=900)[0]
    else:
        ref = reference(model_overrides)
    assert_matches(result, ref)
