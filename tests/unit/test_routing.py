"""Hand-worked routing, capacity, dropping and padding examples."""

import pytest
import torch

from moefold.dispatch.routing import expert_capacity, keep_mask, position_order, route_slots


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


def test_position_policy_drops_tail_positions_of_every_sequence():
    # 2 sequences x 3 positions, batch-major: tokens 0-2 are sequence 0, 3-5 sequence 1. All
    # route to expert 0 with capacity 4: positions 0 and 1 of both sequences stay, position 2
    # of both drops (not the whole of sequence 1).
    ids = torch.zeros(6, 1, dtype=torch.long)
    probs = torch.rand(6, 1)
    keep = keep_mask(ids, probs, num_experts=2, capacity=4, drop_policy="position", num_sequences=2)
    assert keep.flatten().tolist() == [True, True, False, True, True, False]
    routing = route_slots(ids, probs, 2, 1.25, "position", num_sequences=2)  # C = 4
    assert routing.slots_R.tolist() == [0, 1, 3, 4]  # rows keep token order inside an expert


def test_position_order_is_sequence_major_with_slots_of_a_token_together():
    # T = 4 (2 sequences of 2), K = 2: slot t*K+k ranks at (s, b, k)
    assert position_order(4, 2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    with pytest.raises(ValueError, match="num_sequences"):
        position_order(5, 1, 2)


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


@pytest.mark.parametrize("cp,tp", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (1, 4)])
def test_local_positions_increase_so_position_policy_ranks_global_positions(cp, tp):
    # Under cp / sp a rank's tokens are its chunks of every sequence in increasing global
    # position, so ranking local positions (position_order) ranks global ones.
    from moefold.model.transformer import SequencePositions

    for cp_rank in range(cp):
        for tp_rank in range(tp):
            local = SequencePositions(cp, cp_rank, tp, tp_rank).local(32)
            assert torch.all(local[1:] > local[:-1])
