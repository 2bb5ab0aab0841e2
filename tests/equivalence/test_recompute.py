"""train.recompute on folded layouts equals the single process without recomputation: the
recomputed MoE layers and blocks re-run their collectives (ep all-to-all, tp/cp, router
statistics over tp x cp and dp) inside backward, on every rank in the same order.

fp32, 5 optimizer steps: losses rtol 1e-5, step-1 gradients rtol 1e-4 (docs/testing.md).
"""

import pytest

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference

# id: (world size, parallel, router variant (also in the reference), recompute mode)
LAYOUTS = {
    "tp2__ep2-moe_act": (2, {"tp": 2, "ep": 2}, (), "moe_act"),
    "tp2__ep2-moe": (2, {"tp": 2, "ep": 2}, (), "moe"),
    "tp2__ep2-full": (2, {"tp": 2, "ep": 2}, (), "full"),
    # the running global_aux prefix is all-gathered over dp again in the recomputation
    "dp2__ep2-global_aux-moe": (2, {"ep": 2}, ("moe.aux_loss=global_aux",), "moe"),
    "pp2-dp2__pp2-ep2-full": (4, {"pp": 2, "ep": 2}, (), "full"),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_recompute_on_folded_layout_matches_single_process(layout):
    world_size, parallel, variant, mode = LAYOUTS[layout]
    overrides = (*variant, f"train.recompute={mode}")
    result = run_ranks(layout_body, world_size, overrides, parallel, timeout=900)[0]
    assert_matches(result, reference(variant))
