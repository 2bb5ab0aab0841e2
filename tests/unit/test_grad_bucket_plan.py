"""plan_buckets: reverse order, one key per bucket, closed at the size cap."""

import math

import torch

from moefold.parallel.grad_buckets import padded_flat, plan_buckets


def test_buckets_walk_backwards_and_close_at_the_cap():
    # indices 0..5, all one family, 4 bytes each, cap 8 bytes: pairs from the end
    assert plan_buckets([4] * 6, ["a"] * 6, 8) == [[5, 4], [3, 2], [1, 0]]


def test_a_parameter_above_the_cap_fills_a_bucket_alone():
    assert plan_buckets([4, 100, 4, 4], ["a"] * 4, 8) == [[3, 2], [1], [0]]


def test_each_bucket_holds_one_key_in_closing_order():
    nbytes = [4, 4, 4, 4, 4, 4]
    keys = ["expert", "dense", "expert", "dense", "expert", "dense"]
    # backwards: 5 dense, 4 expert, 3 dense (closes dense [5, 3]), 2 expert (closes [4, 2]),
    # 1 dense, 0 expert; the open ones follow in the order their keys first came up
    assert plan_buckets(nbytes, keys, 8) == [[5, 3], [4, 2], [1], [0]]


def test_no_cap_gives_one_bucket_per_key():
    keys = [("expert", True), ("replicated", False), ("expert", True), ("expert", False)]
    assert plan_buckets([4] * 4, keys, math.inf) == [[3], [2, 0], [1]]


def test_padded_flat_pads_with_zeros():
    flat = padded_flat([torch.ones(2, 2), torch.full((1,), 2.0)], 8)
    assert flat.tolist() == [1, 1, 1, 1, 2, 0, 0, 0]
