"""Defaults never refuse a valid layout: eval_batches adapts to dp, vpp > 1 picks the
interleaved schedule."""

import pytest

from moefold.config import ConfigError, check_job, load_job


@pytest.mark.parametrize(("dp", "expected"), [(1, 4), (2, 4), (3, 6), (4, 4), (8, 8), (16, 16)])
def test_default_eval_batches_is_the_smallest_multiple_of_dp_from_four(dp, expected):
    train = load_job("tiny-moe").train
    assert train.eval_batches == 0
    assert train.eval_batches_for(dp) == expected


def test_world_six_tp2_ep2_passes_with_the_default_eval_batches():
    overrides = ["parallel.tp=2", "parallel.ep=2", "train.global_batch=12", "train.micro_batch=2"]
    check_job(load_job("tiny-moe", overrides), 6)  # dp = 3
    with pytest.raises(ConfigError, match="train.eval_batches: 4 is not a multiple of dp=3"):
        check_job(load_job("tiny-moe", [*overrides, "train.eval_batches=4"]), 6)


def test_explicit_eval_batches_is_kept():
    assert load_job("tiny-moe", ["train.eval_batches=6"]).train.eval_batches_for(3) == 6


def test_vpp_alone_implies_the_interleaved_schedule():
    job = load_job("tiny-moe", ["parallel.pp=2", "parallel.vpp=2"])
    assert job.parallel.pp_schedule == "interleaved_1f1b"
    check_job(job, 2)
    assert load_job("tiny-moe", ["parallel.pp=2"]).parallel.pp_schedule == "1f1b"
    with pytest.raises(ConfigError, match="parallel.vpp"):
        check_job(
            load_job("tiny-moe", ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=gpipe"]),
            2,
        )
