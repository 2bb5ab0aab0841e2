"""The planner: calibration against the MoE Parallel Folding paper, the pre-folding rules, node
placement against ParallelLayout's groups, the memory model, and the JSON document's schema."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from contextlib import redirect_stdout

import pytest
import torch

from moefold.cli import main
from moefold.config import check_job, job_from_dict, job_to_dict, load_job
from moefold.model.size import count_parameters
from moefold.parallel.layout import ParallelLayout
from moefold.plan.command import SCHEMA, TIME_KEYS
from moefold.plan.cost import Candidate, CostModel, GroupSpan, Workload
from moefold.plan.hardware import Device, get_device, gpu_device
from moefold.plan.memory import MEMORY_KINDS, local_params, rank_layers
from moefold.plan.search import enumerate_candidates, plan, topology
from moefold.train.peak import cpu_model_name

# (preset, GPUs, folded best (tp, cp, pp, ep, etp), its MFU, best before folding, its MFU):
# H100, global batch 256, sequence 4096, token dropping with capacity factor 1 (the paper).
PAPER = {
    "mixtral-8x22b": (128, (2, 1, 8, 8, 1), 0.493, (2, 1, 8, 4, 2), 0.463),
    "qwen2-57b-a14b": (64, (2, 1, 4, 4, 1), 0.390, (2, 1, 4, 4, 2), 0.353),
}


def paper_workload(preset: str) -> Workload:
    job = load_job(preset)
    moe = dataclasses.replace(job.moe, capacity_factor=1.0)
    return Workload(model=job.model, moe=moe, seq_len=4096, global_batch=256, dtype="bf16")


def degrees(c: Candidate) -> tuple[int, ...]:
    return (c.tp, c.cp, c.pp, c.ep, c.etp)


@pytest.fixture(scope="module")
def paper_plans():
    """(folded plan, pre-folding plan) per calibration model, computed once."""
    h100 = gpu_device("h100")
    plans = {}
    for preset, (gpus, *_) in PAPER.items():
        w = paper_workload(preset)
        plans[preset] = tuple(
            plan(w, gpus, h100, nodes_of=8, fold=fold, top=50) for fold in (True, False)
        )
    return plans


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_calibration_top_folded_layout_is_the_papers(paper_plans, preset):
    _, best, mfu, _, _ = PAPER[preset]
    folded, _ = paper_plans[preset]
    top = folded.ranked[0]
    assert degrees(top.candidate) == best
    assert abs(top.mfu - mfu) <= 0.03, f"predicted {top.mfu:.3f}, paper {mfu}"


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_folding_beats_the_pre_folding_rules(paper_plans, preset):
    folded, pre_folding = paper_plans[preset]
    assert folded.ranked[0].step_time < pre_folding.ranked[0].step_time
    assert folded.ranked[0].mfu > pre_folding.ranked[0].mfu


def test_pre_folding_candidates_follow_the_old_rules():
    w = paper_workload("mixtral-8x22b")
    candidates = list(enumerate_candidates(w, 64, fold=False))
    assert candidates
    for c in candidates:
        assert c.etp == c.tp and c.dp % c.ep == 0 and not c.folded
    folded = {degrees(c) for c in enumerate_candidates(w, 64, fold=True) if c.cp == 1}
    assert {degrees(c) for c in candidates if c.cp == 1} <= folded


def test_pre_folding_ep_groups_are_strided_by_tp_times_cp():
    # 16 ranks, tp2 cp2 dp4, ep2: ep ranks are dp neighbours, 4 ranks apart; nodes of 4 ranks
    spans = topology(16, 2, 2, 1, 2, 2, False, 4)
    assert spans.ep == GroupSpan(2, 2, 1.0, 1)  # {0, 4}: two nodes
    assert topology(16, 2, 2, 1, 2, 1, True, 4).ep == GroupSpan(2, 1, 0.0, 1)  # folded: {0, 1}


def _span_reference(groups: list[list[int]], nodes_of: int) -> tuple[int, float, int]:
    """Slow reference: worst (nodes, off-node peer share, fewest members on a node)."""
    worst = (1, 0.0, 1)
    for group in groups:
        nodes = [r // nodes_of for r in group]
        if len(set(nodes)) == 1:
            continue
        fewest = min(nodes.count(n) for n in set(nodes))
        off = 1 - (fewest - 1) / (len(group) - 1)
        worst = max(worst, (len(set(nodes)), off, fewest))
    return worst


@pytest.mark.parametrize(
    "world,tp,cp,pp,ep,etp,nodes_of",
    [
        (16, 2, 1, 2, 4, 1, 4),
        (32, 2, 2, 2, 8, 1, 8),
        (64, 4, 1, 2, 4, 2, 8),
        (24, 1, 3, 2, 4, 1, 8),
        (128, 2, 1, 8, 8, 1, 8),
        (64, 2, 1, 4, 4, 1, 8),
    ],
)
def test_topology_matches_layout_group_membership(world, tp, cp, pp, ep, etp, nodes_of):
    layout = ParallelLayout.build(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
    spans = topology(world, tp, cp, pp, ep, etp, True, nodes_of)
    families = {
        "tp": (("tp",), "dense"),
        "cp": (("cp",), "dense"),
        "dp": (("dp", "cp"), "dense"),
        "ep": (("ep",), "expert"),
        "etp": (("etp",), "expert"),
        "edp": (("edp",), "expert"),
    }
    for family, (axes, view) in families.items():
        span = getattr(spans, family)
        groups = layout.groups(axes, view)
        assert span.size == len(groups[0])
        if span.size > 1:
            assert (span.nodes, span.off_node, span.per_node) == _span_reference(groups, nodes_of)


def test_every_candidate_passes_check_job():
    base = job_to_dict(load_job("tiny-moe", ["train.global_batch=16", "train.seq_len=128"]))
    w = Workload(
        model=load_job("tiny-moe").model,
        moe=load_job("tiny-moe").moe,
        seq_len=128,
        global_batch=16,
        dtype="fp32",
    )
    candidates = list(enumerate_candidates(w, 8))
    assert len(candidates) > 100
    for c in candidates[::7]:
        raw = {
            **base,
            "parallel": {
                "tp": c.tp,
                "cp": c.cp,
                "pp": c.pp,
                "vpp": c.vpp,
                "ep": c.ep,
                "etp": c.etp,
                "pp_schedule": "interleaved_1f1b" if c.vpp > 1 else "1f1b",
                "distributed_optimizer": c.distributed_optimizer,
            },
        }
        raw["train"] = {**base["train"], "micro_batch": c.micro_batch, "eval_batches": c.dp}
        job = job_from_dict(raw)
        layout = ParallelLayout.from_config(job.parallel, 8)
        check_job(job, 8)
        assert (layout.dp, layout.edp) == (c.dp, c.edp)


# ---- the memory model ----------------------------------------------------------------------


def test_local_parameters_add_up_to_the_model():
    tied = load_job("tiny-dense", ["model.tie_embeddings=true"])
    workloads = [paper_workload(p) for p in ("mixtral-8x22b", "qwen2-57b-a14b", "tiny-moe")]
    workloads.append(Workload(model=tied.model, moe=tied.moe, seq_len=128, global_batch=16))
    for w in workloads:
        counts = count_parameters(w.model, w.moe)
        for pp, ep in ((1, 1), (4, 2), (2, 8)):
            if w.model.layers % pp or (pp > 1 and w.model.tie_embeddings):
                continue
            if ep > 1 and (not w.moe.enabled or w.moe.num_experts % ep):
                continue
            c = Candidate(
                tp=1,
                cp=1,
                pp=pp,
                vpp=1,
                dp=1,
                ep=ep,
                etp=1,
                edp=1,
                micro_batch=1,
                recompute=False,
                distributed_optimizer=False,
            )
            flags = tuple(w.moe.is_moe_layer(i) for i in range(w.model.layers))
            total_dense = total_expert = 0.0
            for rank, (num_dense, num_moe) in enumerate(rank_layers(w.model.layers, pp, 1, flags)):
                p = local_params(w, c, num_dense, num_moe, rank == 0, rank == pp - 1)
                total_dense += p.dense
                total_expert += p.expert * ep
            assert total_expert == counts.experts
            assert total_dense + total_expert == counts.total


def _memory(w: Workload, device: Device, **knobs) -> dict:
    fields = dict(
        tp=2,
        cp=1,
        pp=4,
        vpp=1,
        dp=8,
        ep=4,
        etp=1,
        edp=4,
        micro_batch=1,
        recompute=False,
        distributed_optimizer=True,
    )
    fields.update(knobs)
    c = Candidate(**fields)
    world = c.tp * c.cp * c.pp * c.dp
    topo = topology(world, c.tp, c.cp, c.pp, c.ep, c.etp, True, 8)
    return CostModel(w, device).memory(c, topo)


def test_memory_model_moves_the_right_way():
    w, h100 = paper_workload("qwen2-57b-a14b"), gpu_device("h100")
    base = _memory(w, h100)
    assert set(base) == {*MEMORY_KINDS, "total"}
    assert base["total"] == pytest.approx(sum(base[k] for k in MEMORY_KINDS))
    assert _memory(w, h100, micro_batch=2)["activations"] > 1.9 * base["activations"] * 0.99
    assert _memory(w, h100, recompute=True)["activations"] < base["activations"] / 3
    assert _memory(w, h100, distributed_optimizer=False)["optimizer"] > 3 * base["optimizer"]
    interleaved = _memory(w, h100, vpp=7)
    assert interleaved["activations"] > base["activations"]
    assert interleaved["weights"] == pytest.approx(base["weights"], rel=1e-3)
    more_experts = _memory(w, h100, ep=8, edp=2)
    assert more_experts["weights"] < base["weights"]


def test_data_parallel_bytes_follow_moefold_comm_accounting():
    # tiny-moe on 2 ranks, ep2 (dp2, edp1): all-reduce of the dense fp32 grads,
    # 2 (n - 1) / n * bytes, exactly what CommStats records for family "dp".
    job = load_job("tiny-moe")
    w = Workload(model=job.model, moe=job.moe, seq_len=128, global_batch=16, dtype="fp32")
    counts = count_parameters(job.model, job.moe)
    c = Candidate(
        tp=1,
        cp=1,
        pp=1,
        vpp=1,
        dp=2,
        ep=2,
        etp=1,
        edp=1,
        micro_batch=4,
        recompute=False,
        distributed_optimizer=False,
    )
    cpu_like = dataclasses.replace(gpu_device("h100"), overlap=False)
    estimate = CostModel(w, cpu_like).estimate(c, topology(2, 1, 1, 1, 2, 1, True, 2), always=True)
    dense = counts.total - counts.experts
    assert estimate.comm_bytes["dp"] == 2 * (2 - 1) / 2 * dense * 4
    assert estimate.comm_bytes["edp"] == 0
    # ep: every routed row crosses to the other rank with probability 1/2, four exchanges per
    # micro-batch and layer (dispatch and combine, forward and backward), 2 micro-batches
    rows = 4 * 128 * job.moe.topk
    assert estimate.comm_bytes["ep"] == pytest.approx(
        rows * job.model.hidden * 4 / 2 * 4 * job.model.layers * 2
    )


# ---- the command ---------------------------------------------------------------------------

LAYOUT_KEYS = [
    "rank",
    "tp",
    "cp",
    "pp",
    "vpp",
    "dp",
    "etp",
    "ep",
    "edp",
    "micro_batch",
    "recompute",
    "distributed_optimizer",
    "folded",
    "memory_gib",
    "time_s",
    "comm_bytes",
    "tokens_per_s",
    "mfu",
    "set",
]


def _run_cli(*args: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", *args]) == 0
    return out.getvalue()


def test_json_document_schema_is_stable():
    doc = json.loads(
        _run_cli(
            "--model",
            "mixtral-8x7b",
            "--gpus",
            "64",
            "--gpu",
            "h100",
            "--capacity-factor",
            "1",
            "--top",
            "3",
            "--json",
        )
    )
    assert list(doc) == ["schema", "query", "device", "counts", "layouts", "without_folding"]
    assert doc["schema"] == SCHEMA
    assert list(doc["query"]) == [
        "model",
        "overrides",
        "gpus",
        "gpu",
        "nodes_of",
        "seq_len",
        "global_batch",
        "fold",
        "capacity_factor",
        "dtype",
        "top",
    ]
    assert list(doc["device"]) == [
        "name",
        "peak_tflops",
        "memory_gib",
        "intra_node_gbps",
        "inter_node_gbps",
        "source",
    ]
    assert list(doc["counts"]) == ["candidates", "evaluated", "fitting"]
    assert len(doc["layouts"]) == 3
    for entry in [*doc["layouts"], doc["without_folding"]]:
        assert list(entry) == LAYOUT_KEYS
        assert list(entry["memory_gib"]) == [*MEMORY_KINDS, "total"]
        assert list(entry["time_s"]) == list(TIME_KEYS)
        assert list(entry["comm_bytes"]) == ["tp", "cp", "ep", "etp", "pp", "dp", "edp"]
    times = [entry["time_s"]["total"] for entry in doc["layouts"]]
    assert times == sorted(times)
    first = doc["layouts"][0]
    assert sum(v for k, v in first["time_s"].items() if k != "total") == pytest.approx(
        first["time_s"]["total"], rel=1e-3
    )


def test_table_output_and_no_fold_flag():
    text = _run_cli("--model", "mixtral-8x7b", "--gpus", "32", "--no-fold", "--top", "2")
    assert "pre-folding rules" in text and "MFU" in text
    assert "best layout under the pre-folding rules" not in text
    assert "-m moefold train --config mixtral-8x7b --set train.seq_len=4096" in text


def test_bad_arguments_are_config_errors(capsys):
    assert main(["plan", "--model", "tiny-moe", "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err


def test_cpu_device_reads_its_measurements_from_the_cache(tmp_path):
    cpu, version = cpu_model_name(), torch.__version__
    (tmp_path / "peak.json").write_text(
        # The cache keeps the best figure ever seen, so the cached one must beat any real CPU
        # (a 1e11 entry lost to this AVX-512 host's 1.5e11 measured on one thread).
        json.dumps({f"{cpu}|threads=1|float32|n=2048|torch={version}": {"flops_per_s": 1e15}})
    )
    measured = {
        "memory_total": 8e9,
        "elementwise_bandwidth": 1e10,
        "gemm_half_dim": 4.0,
        "attention_flops": 3e14,  # 0.3 of the cached peak
        "op_overhead": 3e-6,
        "gloo_latency": 1e-4,
        "gloo_bandwidth": 2e9,
        "gloo_all_to_all_bandwidth": 1e9,
        "runtime_memory": 4e8,
    }
    (tmp_path / "plan_cpu.json").write_text(
        json.dumps({f"{cpu}|threads=1|torch={version}|v5": measured})
    )
    device = get_device("cpu", torch.float32, ranks_per_node=2, cache_dir=str(tmp_path))
    share = min(1.0, (os.cpu_count() or 1) / 2)
    assert device.peak_flops == pytest.approx(1e15 * share)
    assert device.memory_bytes == 4e9 and device.runtime_memory_bytes == 4e8
    assert device.attention_efficiency == pytest.approx(0.3)
    assert device.all_to_all_efficiency == pytest.approx(0.5)
    assert not device.overlap and not device.grouped_gemm
    assert "cache" in device.source
