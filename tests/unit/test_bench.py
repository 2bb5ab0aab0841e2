"""`moefold.bench.moe_layer` runs on a tiny workload and prints well-formed rows (no timing)."""

import json

import pytest

from moefold.bench import moe_layer
from moefold.bench.timing import Column, format_table

TINY = [
    "--tokens", "32", "--batch", "2", "--hidden", "16", "--ffn", "24", "--experts", "4",
    "--topk", "2", "--steps", "2", "--warmup", "1", "--peak-size", "32", "--ep", "1",
]  # fmt: skip
COLUMNS = [
    "name", "shape", "dtype", "ep", "tokens_per_s", "tflops", "pct_of_peak", "ratio_vs_dense",
    "paired_q1-q3", "ratio_vs_best_peer", "step_ms", "timed",
]  # fmt: skip
REQUIRED_ROWS = {  # HF blocks: their per-expert loop and grouped_mm (transformers' default)
    "dense", "moefold", "moefold-cf1", "hf-mixtral", "hf-qwen3-moe", "hf-mixtral-grouped_mm",
    "hf-qwen3-moe-grouped_mm",
}  # fmt: skip


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]  # header, (rule), rows


@pytest.mark.slow
def test_moe_layer_table_has_one_row_per_implementation_and_dtype(capsys):
    argv = TINY + ["--dtype", "fp32", "bf16", "--capacity-factor", "none", "1.0"]
    assert moe_layer.main([*argv, "--bf16-workload", "full"]) == 0
    out = capsys.readouterr().out
    header, rows = table_rows(out)
    assert header == COLUMNS
    for dtype in ("fp32", "bf16"):
        names = {row[0] for row in rows if row[2] == dtype}
        assert REQUIRED_ROWS <= names
    for row in rows:
        assert row[1] == "full" and row[3] == "1"
        assert float(row[4]) > 0  # tokens/s; the rounded TFLOP/s of a tiny workload may read 0
        assert all(float(value) >= 0 for value in row[5:8] + row[9:])
        first, third = (float(value) for value in row[8].split("-"))
        assert 0 <= first <= third  # 2 decimals: a row 200x slower under load reads 0.00
    assert {row[7] for row in rows if row[0] == "dense"} == {"1.000"}
    assert {row[8] for row in rows if row[0] == "dense"} == {"1.00-1.00"}  # paired quartiles
    assert "# peak: fp32 " in out and "bf16 parameters and inputs" in out


@pytest.mark.slow
def test_moe_layer_json_rows_are_complete(capsys):
    assert moe_layer.main(TINY + ["--dtype", "fp32", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document["peak_flops"]) == {"fp32"}
    rows = document["rows"]
    assert {"dense", "moefold", "hf-mixtral", "hf-qwen3-moe"} <= {row["name"] for row in rows}
    for row in rows:
        assert {*COLUMNS, "ratio_vs_dense_iqr"} - {"paired_q1-q3"} <= set(row)
        assert len(row["step_s_all"]) == 2
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0
    dense = next(row for row in rows if row["name"] == "dense")
    assert dense["ratio_vs_dense"] == 1.0
    peers = [row for row in rows if row["name"] != "dense" and "moefold" not in row["name"]]
    assert max(row["ratio_vs_best_peer"] for row in peers) == 1.0  # the fastest peer


@pytest.mark.slow
def test_autocast_mode_runs(capsys):
    argv = TINY + ["--dtype", "bf16", "--bf16-mode", "autocast", "--hf-experts", "eager"]
    assert moe_layer.main(argv) == 0
    out = capsys.readouterr().out
    assert "torch.autocast(cpu, bf16)" in out
    assert {row[0] for row in table_rows(out)[1]} >= {"dense", "moefold"}


@pytest.mark.slow
def test_ep_rows_split_the_same_tokens_over_gloo_ranks(capsys):
    argv = [*TINY[:-2], "--ep", "1", "2", "--dtype", "fp32", "--hf-experts", "eager", "--json"]
    assert moe_layer.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    ep2 = {row["name"]: row for row in rows if row["ep"] == 2}
    assert {"dense", "moefold", "moefold-cf1"} <= set(ep2)  # dropless and cf 1 by default
    ep1 = {row["name"]: row for row in rows if row["ep"] == 1}
    # Same global workload at every ep: the model FLOPs of a step are the same.
    assert ep2["moefold"]["step_flops"] == ep1["moefold"]["step_flops"]
    assert ep2["dense"]["step_flops"] == ep1["dense"]["step_flops"]
    assert ep2["dense"]["ratio_vs_dense"] == 1.0 and ep2["moefold"]["tokens_per_s"] > 0


def test_bf16_shapes_follow_the_bf16_workload_flag():
    workload = moe_layer.Workload(
        batch=2, seq=2048, hidden=1024, ffn_hidden=3584, num_experts=8, topk=2
    )

    def plan(mode: str) -> list[tuple]:
        args = moe_layer.build_parser().parse_args(["--bf16-workload", mode])
        return [
            (s.dtype_name, s.shape, s.with_peers, s.workload.num_tokens, s.workload.hidden)
            for s in moe_layer.plan_sections(args, workload)
        ]

    fp32 = ("fp32", "full", True, 4096, 1024)
    assert plan("full") == [fp32, ("bf16", "full", True, 4096, 1024)]
    assert plan("small") == [fp32, ("bf16", "small", True, 1024, 512)]
    assert plan("both") == [
        fp32,
        ("bf16", "full", False, 4096, 1024),
        ("bf16", "small", True, 1024, 512),
    ]
    expected_auto = plan("both") if moe_layer.cpu_bf16_gemm_is_slow() else plan("full")
    assert plan("auto") == expected_auto


@pytest.mark.slow
def test_the_full_bf16_shape_without_peers_has_dense_and_moefold_only(capsys):
    argv = TINY + ["--dtype", "bf16", "--bf16-workload", "both", "--json"]
    assert moe_layer.main(argv) == 0  # default capacity factors: dropless and 1.0
    rows = json.loads(capsys.readouterr().out)["rows"]
    full = {row["name"] for row in rows if row["shape"] == "full"}
    assert full == {"dense", "moefold", "moefold-cf1"}
    small = {row["name"] for row in rows if row["shape"] == "small"}
    # The small shape halves hidden 16 and ffn 24 to 8 and 12: grouped_mm would raise on rows
    # of 12 bf16 (24 bytes), so the HF grouped_mm rows are left out there.
    assert {name for name in REQUIRED_ROWS if "grouped_mm" not in name} <= small
    assert not any("grouped_mm" in name for name in small)


def test_paper_workload_flops_match_the_documented_figure():
    workload = moe_layer.Workload(
        batch=2, seq=2048, hidden=1024, ffn_hidden=3584, num_experts=8, topk=2
    )
    assert round(workload.moe_step_flops() / 1e9, 1) == 541.4  # docs/benchmarks.md
    router = 3 * 2 * 4096 * 1024 * 8
    assert workload.moe_step_flops() - workload.dense_step_flops() == router


@pytest.mark.slow
def test_row_budget_cuts_ep1_rows_short_and_leaves_ranks_every_step(capsys):
    """--row-budget-s below one step: every ep = 1 row gets one timed step, while the ep = 2
    ranks still run all three (they must run the same steps)."""
    argv = [*TINY[:-2], "--ep", "1", "2", "--dtype", "fp32", "--capacity-factor", "none"]
    argv += ["--hf-experts", "eager", "--steps", "3", "--row-budget-s", "1e-9", "--json"]
    assert moe_layer.main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    timed = {(row["name"], row["ep"]): row["timed"] for row in document["rows"]}
    assert {count for (_, ep), count in timed.items() if ep == 1} == {1}
    assert {count for (_, ep), count in timed.items() if ep == 2} == {3}
    assert all(len(row["step_s_all"]) == row["timed"] for row in document["rows"])
    assert "add up to 1e-09 s" in document["timing"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--tokens", "33", "--batch", "2"],
        ["--topk", "9"],
        ["--capacity-factor", "0"],
        ["--ep", "3"],
        ["--row-budget-s", "-1"],
    ],
    ids=[
        "tokens-not-divisible",
        "topk-above-experts",
        "capacity-factor-zero",
        "ep-not-dividing",
        "negative-row-budget",
    ],
)
def test_bad_arguments_exit_with_usage_error(argv):
    with pytest.raises(SystemExit) as error:
        moe_layer.main(argv)
    assert error.value.code == 2


def test_format_table_right_aligns_numbers():
    rows = [{"name": "a", "x": 1.5}, {"name": "long-name", "x": 12.25}]
    text = format_table(rows, [Column("name", "name"), Column("x", "x", ".2f")])
    assert text.splitlines() == [
        "| name      |     x |",
        "|-----------|------:|",
        "| a         |  1.50 |",
        "| long-name | 12.25 |",
    ]


def test_time_interleaved_aligns_before_every_timed_step_outside_the_timer(monkeypatch):
    """`align` (a barrier on ranks) runs before each timed step and is never timed: a fake
    clock that only `align` advances must give zero-second steps."""
    from moefold.bench import timing

    clock, calls = [0.0], []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def align():
        calls.append("align")
        clock[0] += 100.0

    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    seconds = timing.time_interleaved(steps, steps=2, warmup=1, align=align)
    assert seconds == {"a": [0.0, 0.0], "b": [0.0, 0.0]}
    assert calls == ["a", "b"] + ["align", "a", "align", "b"] * 2  # warm-ups are not aligned


def test_time_interleaved_budget_drops_a_slow_row_after_its_budget(monkeypatch):
    """With budget_s, a row leaves the rotation once its timed seconds reach the budget (the
    step that crosses it counts); the others keep every step, and a row is always timed once."""
    from moefold.bench import timing

    clock, calls = [0.0], []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    cost = {"fast": 1.0, "slow": 4.0, "glacial": 50.0}

    def make(name):
        def step():
            calls.append(name)
            clock[0] += cost[name]

        return step

    steps = {name: make(name) for name in cost}
    seconds = timing.time_interleaved(steps, steps=4, warmup=1, budget_s=6.0)
    assert seconds == {"fast": [1.0] * 4, "slow": [4.0, 4.0], "glacial": [50.0]}
    timed = calls[3:]  # after one warm-up each
    assert timed == ["fast", "slow", "glacial", "fast", "slow", "fast", "fast"]
    # Rounds stay paired: the quartiles use the rounds both rows ran.
    assert timing.paired_ratio_quartiles(seconds["slow"], seconds["fast"]) == (4.0, 4.0)
    with pytest.raises(ValueError, match="budget_s"):
        timing.time_interleaved(steps, steps=1, warmup=0, align=lambda: None, budget_s=1.0)


def test_paired_ratio_quartiles_pair_steps_of_the_same_round():
    from moefold.bench.timing import paired_ratio_quartiles

    # Both rows slowed down alike in round 3: the paired ratio stays 2.0 throughout.
    assert paired_ratio_quartiles([2.0, 2.0, 8.0, 2.0], [1.0, 1.0, 4.0, 1.0]) == (2.0, 2.0)
    first, third = paired_ratio_quartiles([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
    assert (first, third) == (2.0, 4.0)
    assert paired_ratio_quartiles([3.0], [2.0]) == (1.5, 1.5)


@pytest.mark.parametrize("bf16_is_upcast", [True, False])
def test_pool_peaks_shares_the_best_reading_of_one_gemm_kernel(monkeypatch, bf16_is_upcast):
    from moefold.bench import timing

    monkeypatch.setattr(timing, "cpu_bf16_gemm_is_slow", lambda: bf16_is_upcast)
    readings = {"fp32": 131e9, "bf16": 182e9}
    pooled = timing.pool_peaks(readings)
    # Upcast: both dtypes time the fp32 GEMM, so the low fp32 reading takes the bf16 one.
    assert pooled == ({"fp32": 182e9, "bf16": 182e9} if bf16_is_upcast else readings)
    assert timing.pool_peaks({"fp32": 5.0}) == {"fp32": 5.0}
