"""Context parallelism (alone and folded with tp, dp and experts) equals the single process."""

import pytest

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference

LAYOUTS = {
    "cp2": (2, {"cp": 2}, ()),
    "cp4": (4, {"cp": 4}, ()),
    "tp2-cp2": (4, {"tp": 2, "cp": 2}, ()),
    "cp2-dp2__ep4": (4, {"cp": 2, "ep": 4}, ()),
    "tp2-cp2-dp2__ep8": (8, {"tp": 2, "cp": 2, "ep": 8}, ()),
    "tp2-cp2-dp2__ep4-etp2-allgather": (
        8,
        {"tp": 2, "cp": 2, "ep": 4, "etp": 2, "dispatcher": "allgather"},
        (),
    ),
    "cp2-dp2__ep2-seq_aux": (4, {"cp": 2, "ep": 2}, ("moe.aux_loss=seq_aux",)),
    "tp2-cp2__ep4-global_aux": (4, {"tp": 2, "cp": 2, "ep": 4}, ("moe.aux_loss=global_aux",)),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_context_parallel_layout_matches_single_process(layout):
    world_size, parallel, model_overrides = LAYOUTS[layout]
    result = run_ranks(layout_body, world_size, model_overrides, parallel, timeout=900)[0]
    assert_matches(result, reference(model_overrides))
