"""DeepSeek-V3's architecture folded: MLA (compressed q and kv, shared rotary key, YaRN), a
dense first layer, then node-limited sigmoid routing with expert bias, seq_aux, routed scale
and a shared expert, on layouts that use tp (heads split, compressions replicated), sp, cp
(global YaRN positions), pp, ep, etp and the dedup dispatcher: losses and gradients equal the
single process."""

import pytest

from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import assert_matches, layout_body, reference

DEEPSEEK = (
    "model.kv_heads=8",
    "model.kv_lora_rank=12",
    "model.q_lora_rank=10",
    "model.qk_nope_head_dim=4",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=6",
    "model.yarn_factor=4",
    "model.yarn_original_max_positions=8",
    "model.yarn_mscale_all_dim=1.0",
    "moe.first_dense_layers=1",
    "moe.topk=3",
    "moe.score=sigmoid",
    "moe.norm_topk_prob=true",
    "moe.scaling_factor=2.5",
    "moe.expert_bias=true",
    "moe.num_groups=4",
    "moe.group_topk=2",
    "moe.group_score_topk=2",
    "moe.aux_loss=seq_aux",
    "moe.aux_loss_coeff=0.001",
    "moe.shared_ffn_hidden=16",
    "moe.dedup=true",
)

LAYOUTS = {
    "tp2-cp2__ep4": (4, {"tp": 2, "cp": 2, "ep": 4}),
    "tp2-dp2__ep2-etp2": (4, {"tp": 2, "ep": 2, "etp": 2}),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_deepseek_layout_matches_single_process(layout):
    world_size, parallel = LAYOUTS[layout]
    result = run_ranks(layout_body, world_size, DEEPSEEK, parallel, timeout=900)[0]
    assert_matches(result, reference(DEEPSEEK))


@pytest.mark.dist
def test_deepseek_pp2_tp2_cp2_ep4_matches_single_process():
    parallel = {"pp": 2, "tp": 2, "cp": 2, "ep": 4}
    result = run_ranks(layout_body, 8, DEEPSEEK, parallel, timeout=1800)[0]
    assert_matches(result, reference(DEEPSEEK))
