"""moefold dry-run: one real training step of rank r of an N-rank job on fake tensors."""

import pytest

from moefold.cli import main
from moefold.config import ConfigError, load_job
from moefold.dryrun.routing import RoutingOverride, parse_routing
from moefold.dryrun.shards import distinct_shard_total, parse_ranks
from moefold.dryrun.step import run_rank
from moefold.model.size import count_parameters

TINY_EP = ["parallel.tp=2", "parallel.ep=4"]


def test_routing_override_counts():
    assert RoutingOverride().expert_counts(10, 4) == [3, 3, 2, 2]
    skewed = RoutingOverride(0.5).expert_counts(100, 5)
    assert skewed == [50, 13, 13, 12, 12] and sum(skewed) == 100
    assert parse_routing("balanced") is None and parse_routing("skewed:0.25") == 0.25
    for bad in ("skewed:0", "skewed:1.5", "skewed:x", "hot"):
        with pytest.raises(ConfigError, match="--routing"):
            parse_routing(bad)


@pytest.mark.parametrize(
    "overrides, world_size",
    [(TINY_EP, 8), (["parallel.pp=2", "parallel.tp=2", "parallel.ep=2", "parallel.etp=2"], 8)],
)
def test_distinct_shards_add_up_to_the_model(overrides, world_size):
    job = load_job("tiny-moe", overrides)
    _, total = distinct_shard_total(job, world_size)
    assert total == count_parameters(job.model, job.moe).total


def test_one_rank_step_measures_its_shard():
    job = load_job("tiny-moe", TINY_EP)
    row = run_rank(job, 8, 3, RoutingOverride())
    mem = row.memory_bytes
    assert row.param_count > 0 and mem["params"] == 4 * row.param_count  # fp32 weights today
    assert mem["grads"] == mem["params"]  # ReplicatedAdamW keeps every fp32 gradient
    assert mem["optimizer"] >= 8 * row.param_count  # two fp32 Adam moments
    assert mem["activations_peak"] > 0
    transient = max(mem["activations_peak"], mem["grad_reduction_peak"])
    assert mem["total"] == mem["params"] + mem["grads"] + mem["optimizer"] + transient
    comm = row.comm_bytes
    assert comm["tp"] > 0 and comm["ep"] > 0 and comm["dp"] > 0 and comm["pp"] == 0


def test_distributed_optimizer_shards_the_state():
    plain = run_rank(load_job("tiny-moe", TINY_EP), 8, 0, RoutingOverride())
    sharded = run_rank(
        load_job("tiny-moe", [*TINY_EP, "parallel.distributed_optimizer=true"]),
        8,
        0,
        RoutingOverride(),
    )
    assert sharded.param_count == plain.param_count
    assert sharded.memory_bytes["optimizer"] < plain.memory_bytes["optimizer"] / 1.5


def test_skewed_routing_loads_the_hot_experts_rank():
    job = load_job("tiny-moe", ["parallel.ep=4"])
    balanced = run_rank(job, 4, 0, RoutingOverride())
    skewed = run_rank(job, 4, 0, RoutingOverride(0.7))  # ep rank 0 owns the hot expert
    assert skewed.memory_bytes["activations_peak"] > balanced.memory_bytes["activations_peak"]


def test_pipeline_ranks_run_their_stage():
    job = load_job("tiny-moe", ["parallel.pp=2", "parallel.ep=2", "train.micro_batch=2"])
    first, last = run_rank(job, 4, 0, RoutingOverride()), run_rank(job, 4, 2, RoutingOverride())
    assert first.pp_rank == 0 and last.pp_rank == 1
    assert first.comm_bytes["pp"] > 0 and last.comm_bytes["pp"] > 0


def test_cli_json_rows(capsys):
    import json

    code = main(
        [
            "dry-run",
            "--config",
            "tiny-moe",
            "--world-size",
            "4",
            "--set",
            "parallel.ep=4",
            "--ranks",
            "1,2",
            "--json",
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert [row["rank"] for row in doc["ranks"]] == [1, 2]
    row = doc["ranks"][0]
    for key in ("params", "grads", "optimizer", "activations_peak", "total"):
        assert row["memory_bytes"][key] > 0 and row["plan_memory_bytes"][key] > 0
    assert doc["distinct_shards"]["params"] == doc["model_params"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--world-size", "6", "--set", "parallel.tp=4"], "parallel.tp"),
        (["--world-size", "4", "--config", "no-such-preset"], "no-such-preset"),
        (["--world-size", "4", "--ranks", "9"], "--ranks"),
        (["--world-size", "4", "--routing", "hot"], "--routing"),
    ],
)
def test_cli_errors_before_building(argv, message, capsys):
    assert main(["dry-run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_parse_ranks_default_is_one_rank_per_stage():
    from moefold.parallel.layout import ParallelLayout

    job = load_job("tiny-moe", ["parallel.pp=2", "parallel.tp=2"])
    ranks = parse_ranks(None, job, 8)
    layout = ParallelLayout.from_config(job.parallel, 8)
    assert ranks[0] == 0 and [layout.dense_coords(r)["pp"] for r in ranks] == [0, 1]
    assert parse_ranks("all", job, 8) == list(range(8)) and parse_ranks("5,1", job, 8) == [1, 5]


@pytest.mark.parametrize("rank", [0, 3])
def test_planner_parameters_match_the_built_shards(rank):
    """At tp = 1 the planner's parameters are what moefold builds (with tp > 1 the planner
    counts Megatron's vocab-parallel tables and tp-sharded shared expert; moefold replicates
    them): in fp32 its weight bytes equal the dry run's exactly, first and last stage."""
    from moefold.dryrun.planner import PlannerFigures

    overrides = [
        "parallel.pp=2",
        "parallel.ep=2",
        "moe.shared_ffn_hidden=64",
        "train.dtype=fp32",
        "train.micro_batch=2",
    ]
    job = load_job("tiny-moe", overrides)
    row = run_rank(job, 4, rank, RoutingOverride())
    plan = PlannerFigures(job, 4).memory(row.pp_rank)
    assert plan["params"] == row.memory_bytes["params"] == 4 * row.param_count


def test_planner_counts_the_mtp_depths_on_the_last_stage():
    """tiny-deepseek with one multi-token prediction depth on pp2 tp2 ep4: the depth's block,
    eh_proj and norms live on the last stage, and the planner's parameter bytes there equal
    what the dry run builds (gradients and optimizer state within 1e-4)."""
    from moefold.dryrun.planner import PlannerFigures

    layout = ["parallel.pp=2", "parallel.tp=2", "parallel.ep=4"]
    job = load_job("tiny-deepseek", [*layout, "model.mtp_depths=1"])
    row = run_rank(job, 8, 4, RoutingOverride())
    plan = PlannerFigures(job, 8).memory(row.pp_rank)
    assert plan["params"] == row.memory_bytes["params"]
    for kind in ("grads", "optimizer"):
        assert plan[kind] == pytest.approx(row.memory_bytes[kind], rel=1e-4), kind
    without = PlannerFigures(load_job("tiny-deepseek", [*layout, "model.mtp_depths=0"]), 8)
    assert without.memory(row.pp_rank)["params"] < plan["params"]


@pytest.mark.parametrize("rank", [0, 7])
def test_planner_predicts_the_bytes_each_family_sends(rank):
    """Per family, the planner's bytes sent per step equal what the real step counts on the
    first and the last pipeline stage (pp sends one direction at either end; moefold's head,
    whole on every tp rank, sends nothing over tp; the replicated family spans dp x cp x tp).
    ep within 2%: the dispatcher's count exchange is not modelled."""
    from moefold.dryrun.planner import PlannerFigures

    layout = ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "moe.shared_ffn_hidden=64"]
    job = load_job("tiny-moe", [*layout, "train.dtype=bf16", "parallel.distributed_optimizer=true"])
    row = run_rank(job, 8, rank, RoutingOverride())
    measured = {family: sent for family, sent in row.comm_bytes.items() if sent}
    planned = PlannerFigures(job, 8).comm(row.pp_rank)
    assert measured.keys() == planned.keys() == {"tp", "dp", "ep", "edp", "pp"}
    for family, sent in measured.items():
        tolerance = 0.02 if family == "ep" else 1e-3
        assert sent == pytest.approx(planned[family], rel=tolerance), family
