"""apply_* leave every parameter in exactly one gradient family, with the right shard cuts."""

import pytest

from moefold.config import load_job
from moefold.model import build_model
from moefold.parallel.apply import parallelize_model
from moefold.parallel.data_parallel import REDUCE_GROUP, parameter_family, parameter_shards
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from tests.equivalence.layouts import TINY


def body(rank, world_size, parallel):
    overrides = [
        *TINY,
        "moe.shared_ffn_hidden=8",
        "model.attn_bias=true",
        "model.qk_norm=true",
        *[f"parallel.{k}={v}" for k, v in parallel.items()],
    ]
    job = load_job("tiny-moe", overrides)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    model, _ = parallelize_model(build_model(job), job, groups)
    for name, param in model.named_parameters():
        family = parameter_family(param)
        assert family in REDUCE_GROUP, name
        shards = parameter_shards(param)
        if ".experts." in name:
            assert family == "expert" and [f for f, _ in shards] == ["ep", "etp"], name
        elif (
            groups.size("tp") > 1
            and any(
                key in name
                for key in (
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                )
            )
            and ".shared_expert." not in name
        ):
            assert family == "tensor" and shards[0][0] == "tp", name
        else:
            assert family == "replicated" and shards == (), name


@pytest.mark.dist
@pytest.mark.parametrize(
    "parallel",
    [{"tp": 2, "ep": 2}, {"pp": 2, "etp": 2}, {}],
    ids=["tp2-dp2__ep2", "pp2-dp2__pp2-etp2", "dp4"],
)
def test_every_parameter_in_exactly_one_family(parallel):
    run_ranks(body, 4, parallel)
