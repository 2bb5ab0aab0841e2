"""Hand-worked routing, capacity, dropping and padding examples."""

import torch

from moefold.dispatch.routing import expert_capacity, keep_mask, route_slots


def test_capacity_formula_rounds_up():
    assert expert_capacity(num_tokens=10, num_experts=4, topk=2, capacity_factor=1.0) == 5
    assert expert_capacity(num_tokens=7, num_experts=4, topk=1, capacity_factor=1.0) == 2
    assert expert_capacity(num_tokens=8, num_experts=4, topk=2, capacity_factor=1.5) == 6


def test_dropless_groups_slots_by_expert_in_token_order():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])  # slots 0..5
    probs = torch.rand(3, 2)
    routing = route_slots(ids, probs, num_experts=3, capacity_factor=None)
    # expert 0: slots 1, 2; expert 1: slots 3, 5; expert 2: slots 0, 4
    assert routing.slots_R.tolist() == [1, 2, 3, 5, 0, 4]
    assert routing.tokens_per_expert_E.tolist() == [2, 2, 2]
    assert int(routing.num_dropped) == 0


def test_position_policy_keeps_earliest_tokens():
    ids = torch.tensor([[0], [0], [0], [1]])
    probs = torch.tensor([[0.1], [0.9], [0.5], [0.3]])
    # capacity = ceil(4 * 1 / 2 * 0.5) = 1
    keep = keep_mask(ids, probs, num_experts=2, capacity=1, drop_policy="position")
    assert keep.flatten().tolist() == [True, False, False, True]


def test_probs_policy_keeps_highest_probabilities():
    ids = torch.tensor([[0], [0], [0], [1]])
    probs = torch.tensor([[0.1], [0.9], [0.5], [0.3]])
    keep = keep_mask(ids, probs, num_experts=2, capacity=2, drop_policy="probs")
    assert keep.flatten().tolist() == [False, True, True, True]


def test_capacity_drops_and_counts():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1]])  # expert 0 gets 4 slots
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    # capacity = ceil(4*2/3*1.0) = 3
    routing = route_slots(ids, probs, 3, capacity_factor=1.0, drop_policy="probs")
    # expert 0 keeps tokens 0,1,3 (probs .6,.7,.9) and drops token 2 (0.2); rows in token order
    assert routing.slots_R.tolist() == [0, 2, 6, 1, 3, 7, 5]
    assert routing.tokens_per_expert_E.tolist() == [3, 3, 1]
    assert int(routing.num_dropped) == 1


def test_pad_to_capacity_fills_every_expert():
    ids = torch.tensor([[0], [0], [2]])
    probs = torch.ones(3, 1)
    # capacity = ceil(3/3*2) = 2
    routing = route_slots(ids, probs, 3, capacity_factor=2.0, pad_to_capacity=True)
    assert routing.slots_R.tolist() == [0, 1, -1, -1, 2, -1]
    assert routing.tokens_per_expert_E.tolist() == [2, 2, 2]


def test_all_tokens_to_one_expert_and_empty_experts():
    ids = torch.zeros(5, 1, dtype=torch.long)
    routing = route_slots(ids, torch.ones(5, 1), 4, capacity_factor=None)
    assert routing.tokens_per_expert_E.tolist() == [5, 0, 0, 0]
    assert routing.slots_R.tolist() == [0, 1, 2, 3, 4]
