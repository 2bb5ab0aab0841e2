"""routing.destination_rows: one row per (token, destination rank), hand-worked examples."""

import torch

from moefold.dispatch.routing import destination_rows, route_slots


def test_destination_rows_hand_worked():
    # 3 tokens, top-2 of 4 experts on 2 ranks (rank 0: experts 0, 1; rank 1: experts 2, 3).
    ids = torch.tensor([[0, 1], [1, 2], [3, 2]])
    probs = torch.full((3, 2), 0.5)
    routing = route_slots(ids, probs, 4, None)
    assert routing.slots_R.tolist() == [0, 1, 2, 3, 5, 4]  # experts 0, 1, 1, 2, 2, 3
    rows = destination_rows(routing.slots_R, ids, experts_per_rank=2, num_ranks=2)
    # Rank 0 needs tokens 0 and 1 (token 0 once for both of its experts); rank 1 tokens 1, 2.
    assert rows.unique_per_rank_n.tolist() == [2, 2]
    assert rows.token_index(4).tolist() == [0, 1, 1, 2]
    assert rows.unique_index_R.tolist() == [0, 0, 1, 0, 1, 1]


def test_destination_rows_padding_and_idle_rank():
    # Every token on rank 0's experts; padded to capacity 2 per expert (4 experts).
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    routing = route_slots(ids, probs, 4, 1.0, "position", pad_to_capacity=True)
    # capacity ceil(3 * 2 / 4) = 2: expert 0 keeps slots 0, 3; expert 1 keeps 1, 2.
    assert routing.slots_R.tolist() == [0, 3, 1, 2, -1, -1, -1, -1]
    rows = destination_rows(routing.slots_R, ids, experts_per_rank=2, num_ranks=2)
    assert rows.unique_per_rank_n.tolist() == [2, 0]  # token 2 was dropped from both experts
    assert rows.token_index(2).tolist() == [0, 1]
    assert rows.unique_index_R.tolist() == [0, 1, 0, 1, -1, -1, -1, -1]


def test_unique_rows_expand_back_to_the_slot_rows():
    generator = torch.Generator().manual_seed(0)
    T, K, E, n = 50, 4, 16, 4
    ids = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(T)])
    probs = torch.rand(T, K, generator=generator)
    routing = route_slots(ids, probs, E, None)
    rows = destination_rows(routing.slots_R, ids, E // n, n)
    counts = rows.unique_per_rank_n
    token_index = rows.token_index(int(counts.sum()))
    # Each slot row's token, looked up through its destination's unique block.
    rank_R = ids.flatten()[routing.slots_R] // (E // n)
    starts = torch.cumsum(counts, 0) - counts
    assert torch.equal(token_index[starts[rank_R] + rows.unique_index_R], routing.slots_R // K)
    distinct = sum(len({int(i) // (E // n) for i in row}) for row in ids)
    assert int(counts.sum()) == distinct
