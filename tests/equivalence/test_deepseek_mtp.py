"""DeepSeek-V3 multi-token prediction folded (model/mtp.py): MLA + node-limited MoE with two
MTP depths on a layout that uses pp (the depths on the last stage, their embeddings carried
from the first), tp with sp and cp (the shifted ids cross shard boundaries) and ep with the
dedup dispatcher, and on interleaved stages: losses and gradients, the depths' included, equal
the single process."""

import pytest

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference
from tests.equivalence.test_deepseek import DEEPSEEK

MTP = (*DEEPSEEK, "model.mtp_depths=2", "train.mtp_loss_coeff=0.3")


@pytest.mark.dist
def test_deepseek_mtp_pp2_tp2_cp2_ep4_matches_single_process():
    parallel = {"pp": 2, "tp": 2, "cp": 2, "ep": 4}
    result = run_ranks(layout_body, 8, MTP, parallel, timeout=1800)[0]
    ref = reference(MTP)
    assert any(name.startswith("mtp.1.") for name in ref["grads"])
    assert_matches(result, ref)


@pytest.mark.dist
def test_deepseek_mtp_interleaved_pp2_vpp2_matches_single_process():
    """Four stages on two ranks: the middle stages pass the depth embeddings on."""
    overrides = (*MTP, "model.layers=4")
    parallel = {"pp": 2, "vpp": 2, "pp_schedule": "interleaved_1f1b"}
    result = run_ranks(layout_body, 2, overrides, parallel, timeout=1800)[0]
    assert_matches(result, reference(overrides))
