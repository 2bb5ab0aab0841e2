"""The distributed (ZeRO-1) optimizer gives the single-process losses and grad norms, and its
per-rank optimizer state shrinks with the reduction groups."""

import pytest

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference

LAYOUTS = {
    "dp4": (4, {}),
    "tp2-dp2__ep2": (4, {"tp": 2, "ep": 2}),
    "cp2-dp2__ep2-etp2": (4, {"cp": 2, "ep": 2, "etp": 2}),
    "pp2-dp2__pp2-ep2": (4, {"pp": 2, "ep": 2}),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_distributed_optimizer_matches_single_process(layout):
    world_size, parallel = LAYOUTS[layout]
    result = run_ranks(
        layout_body, world_size, (), {**parallel, "distributed_optimizer": "true"}, timeout=900
    )[0]
    assert_matches(result, reference(()))


@pytest.mark.dist
def test_optimizer_state_shrinks_by_the_shard_count():
    plain = run_ranks(layout_body, 4, (), {}, timeout=900)[0]["last_row"]["optimizer_state_mb"]
    sharded = run_ranks(layout_body, 4, (), {"distributed_optimizer": "true"}, timeout=900)[0][
        "last_row"
    ]["optimizer_state_mb"]
    # dp4, fp32: moments shrink 4x; the master slices are the parameters themselves
    assert sharded == pytest.approx(plain / 4, rel=0.02)
