"""The grad_compression fields: unknown values and incomplete hierarchical settings are refused
naming the field, and a node size must divide the world size."""

import pytest

from moefold.config import ConfigError, check_job, load_job


def test_unknown_compression_is_refused_naming_the_field_and_choices():
    with pytest.raises(ConfigError, match=r"parallel\.grad_compression: got 'int8'.*bytegrad"):
        load_job("tiny-moe", ["parallel.grad_compression=int8"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.grad_compression_hierarchical=true", "parallel.grad_compression_node_size=2"],
        ["parallel.grad_compression_hierarchical=true", "parallel.grad_compression=bytegrad"],
    ],
    ids=["without-bytegrad", "without-node-size"],
)
def test_hierarchical_needs_bytegrad_and_a_node_size(overrides):
    with pytest.raises(ConfigError, match=r"parallel\.grad_compression_hierarchical: needs"):
        load_job("tiny-moe", overrides)


def test_negative_node_size_is_refused():
    with pytest.raises(ConfigError, match=r"parallel\.grad_compression_node_size: must be >= 0"):
        load_job("tiny-moe", ["parallel.grad_compression_node_size=-1"])


def test_node_size_must_divide_the_world_size():
    job = load_job(
        "tiny-moe",
        [
            "parallel.grad_compression=bytegrad",
            "parallel.grad_compression_hierarchical=true",
            "parallel.grad_compression_node_size=4",
            "train.global_batch=96",
            "train.eval_batches=24",
        ],
    )
    check_job(job, 8)
    with pytest.raises(
        ConfigError,
        match=r"parallel\.grad_compression_node_size: world size 6 is not a multiple of 4",
    ):
        check_job(job, 6)
