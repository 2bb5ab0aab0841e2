"""Router maths on small hand-worked examples."""

import math

import pytest
import torch

from moefold.config import ConfigError, MoEConfig, check_job, load_job
from moefold.model.router import TopKRouter


def make_router(**overrides) -> TopKRouter:
    cfg = MoEConfig(**{"num_experts": 4, "topk": 2, "ffn_hidden": 8, **overrides})
    router = TopKRouter(hidden=4, cfg=cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))  # logits == inputs
    return router


def test_softmax_after_topk_mixtral():
    router = make_router(aux_loss="none")
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs, ids = router(x, num_sequences=1)
    assert ids.tolist() == [[1, 2]]
    e = math.exp(1.0)
    torch.testing.assert_close(probs, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))


def test_pre_softmax_uses_full_distribution():
    router = make_router(aux_loss="none", pre_softmax=True)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs, ids = router(x, num_sequences=1)
    full = torch.softmax(x, -1)[0]
    torch.testing.assert_close(probs, full[[1, 2]].unsqueeze(0))
    router = make_router(aux_loss="none", pre_softmax=True, norm_topk_prob=True)
    probs, _ = router(x, num_sequences=1)
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_sigmoid_with_topk_normalisation_and_scaling():
    router = make_router(aux_loss="none", score="sigmoid", norm_topk_prob=True, scaling_factor=2.5)
    x = torch.tensor([[0.5, -1.0, 2.0, 1.0]])
    probs, ids = router(x, num_sequences=1)
    assert ids.tolist() == [[2, 3]]
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(probs[0], 2.5 * s / s.sum())


def test_group_limited_routing_picks_within_best_groups():
    # 4 experts in 2 groups {0,1}, {2,3}; group score = sum of top (topk // group_topk) = top-2.
    router = make_router(aux_loss="none", score="sigmoid", num_groups=2, group_topk=1)
    x = torch.tensor([[3.0, -3.0, 1.0, 1.0]])  # group 0: top-2 sum ~ .95+.05; group 1: .73+.73
    _, ids = router(x, num_sequences=1)
    assert sorted(ids[0].tolist()) == [2, 3]


def test_expert_bias_changes_selection_not_probabilities():
    router = make_router(aux_loss="none", score="sigmoid", expert_bias=True)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = torch.tensor([[0.5, -1.0, 2.0, 1.0]])
    probs, ids = router(x, num_sequences=1)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(probs[0], torch.sigmoid(torch.tensor([1.0, 2.0])))


def test_expert_bias_update_moves_toward_balance():
    router = make_router(expert_bias=True, expert_bias_rate=0.1)
    router.update_expert_bias(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))


def balanced_input():
    # 4 tokens, each picks 2 experts, every expert exactly twice: perfectly balanced counts
    return torch.tensor(
        [[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 2.0, 0.0], [0.0, 2.0, 0.0, 2.0]]
    )


@pytest.mark.parametrize("kind", ["aux", "seq_aux", "global_aux"])
def test_balance_losses_equal_coeff_for_perfectly_balanced_router(kind):
    # balanced_input: tokens (0, 1) form sequence 0, tokens (2, 3) sequence 1. Every token's
    # softmax is (a, a, b, b) up to order with a = e^2 / (2e^2 + 2), b = 1 / (2e^2 + 2), so
    # a + b = 1/2 and each expert's mean probability is 1/4, in the micro-batch and in each
    # sequence; each expert takes 2 of the 8 slots (1/4), and 1 of 4 in each sequence.
    # E * sum_e mean_prob_e * frac_e = 4 * 4 * (1/4 * 1/4) = 1, times coeff 0.5.
    router = make_router(aux_loss=kind, aux_loss_coeff=0.5)
    probs, _ = router(balanced_input(), num_sequences=2)
    torch.testing.assert_close(router.step_aux_loss, torch.tensor(0.5))


@pytest.mark.parametrize("kind", ["aux", "seq_aux", "global_aux"])
def test_balance_losses_equal_coeff_for_uniform_router(kind):
    router = make_router(aux_loss=kind, aux_loss_coeff=0.5)
    with torch.no_grad():
        router.weight.zero_()  # uniform probabilities 1/4; ties pick the first two experts
    x = torch.randn(6, 4)
    router(x, num_sequences=2)
    # frac: experts 0 and 1 get everything (1/2 each), mean prob 1/4 each:
    # E * sum(mean_prob * frac) = 4 * (2 * 1/4 * 1/2) = 1 -> times coeff 0.5
    torch.testing.assert_close(router.step_aux_loss, torch.tensor(0.5))


def test_aux_loss_hand_worked_value_and_gradient_injection():
    router = make_router(aux_loss="aux", aux_loss_coeff=1.0)
    router.aux_grad_scale = 0.5
    x = balanced_input()
    probs, ids = router(x, num_sequences=1)
    scores = torch.softmax(x, -1)
    counts = torch.tensor([2.0, 2.0, 2.0, 2.0])
    expected = 4 * ((scores.sum(0) / 4) * (counts / 8)).sum()
    torch.testing.assert_close(router.step_aux_loss, expected)
    # d(aux)/d(router weight) arrives with scale 0.5 although only probs are back-propagated
    (probs * 0).sum().backward()
    weight = torch.eye(4, requires_grad=True)
    aux = 4 * ((torch.softmax(x @ weight.T, -1).sum(0) / 4) * (counts / 8)).sum()
    (0.5 * aux).backward()
    torch.testing.assert_close(router.weight.grad, weight.grad)


def test_z_loss_value():
    router = make_router(aux_loss="none", z_loss_coeff=0.1)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    router(x, num_sequences=1)
    expected = 0.1 * torch.logsumexp(x, -1).pow(2).mean()
    torch.testing.assert_close(router.step_z_loss, expected)


def test_global_aux_uses_running_counts_over_microbatches():
    router = make_router(aux_loss="global_aux", aux_loss_coeff=1.0)
    x1 = torch.tensor([[5.0, 4.0, 0.0, 0.0]])  # experts 0, 1
    x2 = torch.tensor([[0.0, 0.0, 5.0, 4.0]])  # experts 2, 3
    router(x1, num_sequences=1)
    first = router.step_aux_loss.clone()
    router(x2, num_sequences=1)
    second = router.step_aux_loss - first
    s2 = torch.softmax(x2, -1)[0]
    # after both micro-batches every expert has 1 of 4 slots
    torch.testing.assert_close(second, 4 * (s2 * 0.25).sum())
    s1 = torch.softmax(x1, -1)[0]
    torch.testing.assert_close(first, 4 * (s1 * torch.tensor([0.5, 0.5, 0, 0])).sum())


def test_groups_scored_on_logits_with_softmax_after_topk():
    # Groups {0,1}, {2,3}; one group, top-2. Logit sums: 3 - 3 = 0 vs 1 + 1 = 2 -> group 1.
    # On softmax scores group 0 would win (e^3 + e^-3 > 2e), as it does with pre-softmax.
    x = torch.tensor([[3.0, -3.0, 1.0, 1.0]])
    router = make_router(aux_loss="none", num_groups=2, group_topk=1)
    _, ids = router(x, num_sequences=1)
    assert sorted(ids[0].tolist()) == [2, 3]
    router = make_router(aux_loss="none", num_groups=2, group_topk=1, pre_softmax=True)
    _, ids = router(x, num_sequences=1)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_balance_load_counted_without_bias_or_groups():
    # The bias sends token 0 to experts (3, 2); the loss still counts its unbiased top-2 (2, 0).
    router = make_router(
        aux_loss="aux", aux_loss_coeff=1.0, score="sigmoid", norm_topk_prob=True, expert_bias=True
    )
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = torch.tensor([[1.5, -1.0, 2.0, 1.0]])
    _, ids = router(x, num_sequences=1)
    assert ids.tolist() == [[3, 2]]
    s = torch.sigmoid(x[0])
    s = s / s.sum()
    expected = 4 * (s * torch.tensor([0.5, 0.0, 0.5, 0.0])).sum()
    torch.testing.assert_close(router.step_aux_loss, expected)


def test_router_dtype_fp64_computes_in_double_and_returns_fp32():
    router = make_router(aux_loss="aux", router_dtype="fp64", pre_softmax=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    probs, ids = router(x.float(), num_sequences=1)
    assert probs.dtype == torch.float32
    want = torch.softmax(x.float().double() @ torch.eye(4, dtype=torch.float64), -1)
    torch.testing.assert_close(probs, want.gather(1, ids).float())
    probs.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.dtype == torch.float32


def test_input_jitter_scales_inputs_in_training_only():
    router = make_router(aux_loss="none", input_jitter=0.1, pre_softmax=True)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    torch.manual_seed(3)
    probs, ids = router(x, num_sequences=1)
    torch.manual_seed(3)
    noise = 0.9 + torch.rand(x.shape) * 0.2
    torch.testing.assert_close(probs, torch.softmax(x * noise, -1).gather(1, ids))
    router.eval()
    probs, ids = router(x, num_sequences=1)
    torch.testing.assert_close(probs, torch.softmax(x, -1).gather(1, ids))


@pytest.mark.parametrize(
    "overrides",
    [("moe.topk=1",), ("moe.topk=1", "moe.pre_softmax=true", "moe.norm_topk_prob=true")],
)
def test_top1_without_pre_softmax_is_refused(overrides):
    with pytest.raises(ConfigError, match=r"moe\.topk: .*moe\.pre_softmax=true"):
        check_job(load_job("tiny-moe", list(overrides)))
    check_job(load_job("tiny-moe", ["moe.topk=1", "moe.pre_softmax=true"]))
    check_job(load_job("tiny-moe", ["moe.topk=1", "moe.score=sigmoid"]))


def test_top1_pre_softmax_router_gets_gradient_from_probs():
    router = make_router(aux_loss="none", topk=1, pre_softmax=True)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs, _ = router(x, num_sequences=1)
    probs.sum().backward()
    assert router.weight.grad.abs().sum() > 0
