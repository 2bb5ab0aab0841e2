"""Node-limited routing (DeepSeek-V3) worked by hand: which groups, which experts, what is sent
where; and the router against transformers' DeepseekV3TopkRouter on random configs.

Hand-worked layout: 8 experts on 4 ep ranks (rank r owns experts 2r, 2r + 1), 4 groups = the 4
ranks, a token keeps M = 2 groups and K = 3 experts, a group scores the sum of its best two
biased scores, probabilities are the unbiased sigmoid scores renormalised, times 2.5.
"""

import math

import pytest
import torch

from moefold.config import MoEConfig
from moefold.dispatch.routing import (
    destination_rows,
    expected_destination_ranks,
    max_destination_ranks,
    route_slots,
)
from moefold.model.router import TopKRouter

SCORES = [
    [0.90, 0.10, 0.65, 0.55, 0.80, 0.50, 0.20, 0.30],  # token 0
    [0.30, 0.30, 0.45, 0.35, 0.52, 0.10, 0.25, 0.20],  # token 1
]
BIAS = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.3]


def deepseek_router(num_groups: int, **overrides) -> TopKRouter:
    cfg = MoEConfig(
        num_experts=8,
        topk=3,
        ffn_hidden=4,
        score="sigmoid",
        expert_bias=True,
        norm_topk_prob=True,
        scaling_factor=2.5,
        num_groups=num_groups,
        group_topk=2 if num_groups else 0,
        group_score_topk=2 if num_groups else 0,
        aux_loss="seq_aux",
        aux_loss_coeff=1e-4,
        **overrides,
    )
    router = TopKRouter(hidden=8, cfg=cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(8))  # logits == inputs
        router.expert_bias.copy_(torch.tensor(BIAS))
    return router


def logits() -> torch.Tensor:
    s = torch.tensor(SCORES, dtype=torch.float64)
    return torch.log(s / (1 - s)).float()  # sigmoid(logits) == SCORES


def test_hand_worked_groups_experts_and_probabilities():
    router = deepseek_router(num_groups=4).eval()
    probs, ids = router(logits(), num_sequences=1)
    # Token 0, biased scores [.9 .1 | .65 .55 | .8 .5 | .5 .6]: group sums 1.0, 1.2, 1.3, 1.1
    # -> groups 2 and 1; the best expert overall (0, score .9) sits in group 0 and is not taken.
    # Experts 4 (.8), 2 (.65), 3 (.55); probabilities (.8, .65, .55) / 2.0 * 2.5.
    # Token 1, biased [.3 .3 | .45 .35 | .52 .1 | .55 .5]: sums .6, .8, .62, 1.05 -> groups 3, 1
    # (the bias lifts group 3). Experts 6 (.55), 7 (.5), 2 (.45); probabilities from the
    # unbiased scores (.25, .2, .45) / .9 * 2.5.
    assert ids.tolist() == [[4, 2, 3], [6, 7, 2]]
    want = torch.tensor([[0.8, 0.65, 0.55], [0.25, 0.2, 0.45]])
    want = want / want.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(probs, want)

    unlimited = deepseek_router(num_groups=0).eval()
    _, free_ids = unlimited(logits(), num_sequences=1)
    assert free_ids.tolist() == [[0, 4, 2], [6, 4, 7]]  # ranks {0, 2, 1} and {3, 2}


def test_hand_worked_sends_one_row_per_destination_rank():
    ids = torch.tensor([[4, 2, 3], [6, 7, 2]])
    probs = torch.ones(2, 3)
    slots = route_slots(ids, probs, num_experts=8, capacity_factor=None)
    rows = destination_rows(slots.slots_R, ids, experts_per_rank=2, num_ranks=4)
    # rank 0: nothing; rank 1 (experts 2, 3): tokens 0 and 1; rank 2 (4, 5): token 0;
    # rank 3 (6, 7): token 1. Four unique rows where the plain all-to-all sends six slot rows.
    assert rows.needed_nT.tolist() == [
        [False, False],
        [True, True],
        [True, False],
        [False, True],
    ]
    assert rows.unique_per_rank_n.tolist() == [0, 2, 1, 1]
    assert rows.needed_nT.sum(0).max() <= 2  # every token reaches at most M = 2 ranks
    # Rows handed to the experts in expert order: expert 2 (tokens 0, 1), expert 3 (token 0),
    # expert 4 (token 0), experts 6, 7 (token 1); each points at its token's unique row.
    assert (slots.slots_R // 3).tolist() == [0, 1, 0, 0, 1, 1]
    assert rows.unique_index_R.tolist() == [0, 1, 0, 0, 0, 0]


def test_bias_update_and_seq_aux_follow_the_reference():
    router = deepseek_router(num_groups=4).train()
    x = logits().requires_grad_()
    router(x, num_sequences=1)
    # The load the bias update sees is the node-limited, biased selection.
    counts = torch.tensor([0, 0, 2, 1, 1, 0, 1, 1], dtype=torch.float)
    torch.testing.assert_close(router.step_tokens_per_expert, counts)
    # The sequence balance loss (DeepSeek-V3 eq. 17-20) counts f on the unbiased, ungrouped
    # top-k of the scores and P on the scores normalised over all experts.
    s = torch.tensor(SCORES)
    s_norm = s / s.sum(-1, keepdim=True)
    f = torch.zeros(8).index_add_(0, s.topk(3, -1).indices.flatten(), torch.ones(6))
    f = f * 8 / (3 * 2)
    want = 1e-4 * (f * s_norm.mean(0)).sum()
    torch.testing.assert_close(router.step_aux_loss, want)
    bias = router.expert_bias.clone()
    router.update_expert_bias(router.step_tokens_per_expert)
    mean = counts.mean()
    torch.testing.assert_close(
        router.expert_bias, bias + router.cfg.expert_bias_rate * torch.sign(mean - counts)
    )


@pytest.mark.parametrize(
    "args, bound",
    [
        ((8, 3, 4, 2, 4), 2),  # the hand-worked layout: one group per rank
        ((256, 8, 8, 4, 8), 4),  # DeepSeek-V3's groups on ep = 8: four ranks
        ((256, 8, 8, 4, 64), 8),  # ep = 64: a group spans 8 ranks, K bounds first
        ((256, 8, 0, 0, 8), 8),  # no groups
        ((12, 4, 3, 1, 4), 2),  # groups of 4 over ranks of 3: group 0 straddles ranks 0, 1
    ],
)
def test_max_destination_ranks(args, bound):
    assert max_destination_ranks(*args) == bound


@pytest.mark.parametrize("seed", range(6))
def test_router_equals_transformers_deepseek_v3(seed):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    gen = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (), generator=gen))]

    groups = pick(2, 4, 8)
    per_group = pick(2, 3, 4)
    experts = groups * per_group
    group_topk = pick(*range(1, groups + 1))
    # K >= 2: with K = 1 and norm_topk_prob transformers renormalises the one weight to 1,
    # moefold (as Megatron-Core) keeps the raw score (docs/deepseek.md).
    topk = pick(*range(2, min(group_topk * per_group, 6) + 1))
    norm, scale, hidden = pick(True, False), pick(1.0, 2.5), 16
    hf_cfg = DeepseekV3Config(
        hidden_size=hidden,
        n_routed_experts=experts,
        num_experts_per_tok=topk,
        n_group=groups,
        topk_group=group_topk,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    reference = DeepseekV3TopkRouter(hf_cfg)
    cfg = MoEConfig(
        num_experts=experts,
        topk=topk,
        ffn_hidden=4,
        score="sigmoid",
        expert_bias=True,
        norm_topk_prob=norm,
        scaling_factor=scale,
        num_groups=groups,
        group_topk=group_topk,
        group_score_topk=2,
        aux_loss="none",
    )
    router = TopKRouter(hidden, cfg).eval()
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=gen))
        router.expert_bias.copy_(0.1 * torch.randn(experts, generator=gen))
        reference.weight.copy_(router.weight)
        reference.e_score_correction_bias.copy_(router.expert_bias)
    x = torch.randn(64, hidden, generator=gen)
    probs, ids = router(x, num_sequences=1)
    _, ref_probs, ref_ids = reference(x)
    ref_ids, order = ref_ids.sort(-1)  # transformers does not sort its top-k
    ids, mine = ids.sort(-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(probs.gather(1, mine), ref_probs.gather(1, order))
    assert math.isfinite(float(probs.detach().sum()))


def test_expected_destination_ranks():
    # 4 experts on 2 ranks, K = 2: both on one rank with chance 2 / C(4, 2) = 1/3.
    assert expected_destination_ranks(4, 2, 0, 0, 2) == pytest.approx(2 - 1 / 3)
    # The hand-worked layout: 3 experts from 2 kept groups of 2 always touch both ranks.
    assert expected_destination_ranks(8, 3, 4, 2, 4) == 2.0
    # Without groups it is the dispatch benchmark's figure plus the local rank's share.
    from moefold.bench.dispatch import expected_distinct_remote

    unlimited = expected_destination_ranks(64, 8, 0, 0, 8)
    assert unlimited * 7 / 8 == pytest.approx(expected_distinct_remote(64, 8, 8))
    limited = expected_destination_ranks(64, 8, 8, 4, 8)  # K = 8 among 4 kept ranks' 32
    assert limited == pytest.approx(4 * (1 - math.comb(24, 8) / math.comb(32, 8)))
    assert limited < 4 < unlimited
