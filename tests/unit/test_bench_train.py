"""`moefold bench train` on a tiny model: one row per model and dtype, and the Hugging Face
Mixtral trained from moefold's weights follows moefold's losses (no timing is asserted)."""

import json

import pytest

from moefold.bench import train

pytest.importorskip("transformers")

TINY = [
    "--presets", "tiny-moe", "--steps", "2", "--warmup", "1", "--peak-size", "32", "--threads", "1",
    "--set", "model.hidden=32", "--set", "model.layers=2", "--set", "model.heads=4",
    "--set", "model.kv_heads=2", "--set", "model.vocab_size=128", "--set", "moe.num_experts=4",
    "--set", "moe.ffn_hidden=16", "--set", "train.seq_len=16", "--set", "train.global_batch=4",
    "--set", "train.micro_batch=2", "--set", "data.source=synthetic",
]  # fmt: skip


@pytest.mark.slow
def test_bench_train_rows_and_equal_losses(capsys):
    assert train.main([*TINY, "--dtype", "fp32", "bf16", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["rows"]
    # One HF row per experts implementation, by default the loop and transformers' default.
    hf_names = ["hf-mixtral", "hf-mixtral-grouped_mm"]
    assert [(row["name"], row["dtype"]) for row in rows] == [
        (name, dtype) for dtype in ("fp32", "bf16") for name in ["moefold", *hf_names]
    ]
    for row in rows:
        assert row["ep"] == 1 and row["tokens_per_s"] > 0 and row["tflops"] > 0
        assert len(row["losses"]) == 3 and len(row["step_s_all"]) == 2
    moefold_fp32, *hf_fp32 = rows[:3]
    # The ratio is against the fastest HF row.
    assert max(row["ratio_vs_hf"] for row in hf_fp32) == 1.0
    fastest_hf_ms = min(row["step_ms"] for row in hf_fp32)
    assert moefold_fp32["ratio_vs_hf"] == pytest.approx(fastest_hf_ms / moefold_fp32["step_ms"])
    first, third = moefold_fp32["ratio_vs_hf_iqr"]
    assert 0 < first <= third
    # Same weights, data and optimizer: fp32 losses agree to rounding (3 steps), every HF row.
    assert moefold_fp32["max_loss_diff"] < 1e-5
    for row in hf_fp32:
        assert moefold_fp32["losses"] == pytest.approx(row["losses"], abs=1e-5)
    # bf16 routes in fp32 in moefold and in bf16 in transformers: close, not equal.
    assert rows[3]["max_loss_diff"] < 0.05


def test_bench_train_table_header(capsys):
    assert train.main([*TINY, "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    header_line = next(line for line in out.splitlines() if line.startswith("| preset"))
    header = [cell.strip() for cell in header_line.strip("|").split("|")]
    assert header[:5] == ["preset", "name", "dtype", "ep", "tokens_per_s"]
    assert "max_abs_loss_diff" in header and "# peak: fp32" in out
    assert "defaults to grouped_mm" in out  # transformers 5's experts default, named


@pytest.mark.slow
def test_bench_train_times_only_the_named_hf_implementation(capsys):
    argv = [*TINY, "--steps", "1", "--warmup", "0", "--hf-experts", "eager", "--json"]
    assert train.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["name"] for row in rows] == ["moefold", "hf-mixtral"]


@pytest.mark.slow
def test_bench_train_row_budget_cuts_rows_short_and_compares_common_steps(capsys):
    """--row-budget-s: a budget below one step leaves every row one timed step (after the
    warm-up), and losses are compared over the steps taken."""
    argv = [*TINY, "--steps", "3", "--warmup", "1", "--row-budget-s", "1e-9", "--json"]
    assert train.main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["rows"]
    for row in rows:
        assert row["steps"] == 2 and len(row["losses"]) == 2 and len(row["step_s_all"]) == 1
    assert rows[0]["max_loss_diff"] < 1e-5
    assert "1e-09 s" in document["timing"]


def test_bench_train_rejects_a_negative_row_budget(capsys):
    with pytest.raises(SystemExit):
        train.main([*TINY, "--row-budget-s", "-1"])
    assert "--row-budget-s must be >= 0" in capsys.readouterr().err
