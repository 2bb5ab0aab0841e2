"""Gradient reduction overlapped with backward (parallel.overlap_grad_reduce) leaves losses and
gradients those of the single process: with local and pipelined (1F1B, interleaved) runners,
all-reduce and ZeRO-1 reduce-scatter buckets.

The buckets are tiny (0.01 MiB: about ten per family on the test model), so each family is
split over many collectives, launched from backward hooks in an order that interleaves the
families.
"""

import pytest

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference

OVERLAP = {"overlap_grad_reduce": "true", "grad_bucket_mb": 0.01}
ZERO1 = {"distributed_optimizer": "true"}
FOUR_LAYERS = ("model.layers=4",)

# name -> (world size, parallel settings, model overrides). ZeRO-1's step-1 gradients are its
# reduced slices gathered whole (ShardedAdamW.reduced_gradients).
LAYOUTS = {
    "dp2": (2, {}, ()),
    "tp2-dp2__ep4": (4, {"tp": 2, "ep": 4}, ()),
    "pp2-dp2__pp2-ep2": (4, {"pp": 2, "ep": 2}, ()),
    "pp2-vpp2-dp2__pp2-ep2": (
        4,
        {"pp": 2, "vpp": 2, "pp_schedule": "interleaved_1f1b", "ep": 2},
        FOUR_LAYERS,
    ),
    "tp2-dp2__ep2-zero1": (4, {"tp": 2, "ep": 2, **ZERO1}, ()),
    "pp2-dp2__pp2-ep2-zero1": (4, {"pp": 2, "ep": 2, **ZERO1}, ()),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{name}-overlap" for name in LAYOUTS])
def test_overlapped_reduction_matches_single_process(layout):
    world_size, parallel, model_overrides = LAYOUTS[layout]
    result = run_ranks(
        layout_body, world_size, model_overrides, {**parallel, **OVERLAP}, timeout=900
    )[0]
    assert_matches(result, reference(model_overrides))
