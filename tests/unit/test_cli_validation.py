"""Command-line flags (issue 28): a value a command cannot use is a one-line error naming the
flag and the fix (exit code 2), reported before a checkpoint is read, a process is launched or
a process group starts; an explicit 0 is never silently replaced by a config value."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

import moefold.cli
import moefold.train.launch
from moefold.cli import main
from moefold.config import ConfigError, ModelConfig, MoEConfig, load_job
from moefold.generate import sample
from moefold.model.transformer import Transformer


@pytest.fixture
def nothing_starts(monkeypatch, tmp_path):
    """Any launch, training run or process group fails the test; cwd is a scratch folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("started work before the flags were checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(moefold.cli.subprocess, "call", refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setattr(moefold.train.launch, "run_training", refuse)


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_flag_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert err == f"moefold: config error: {expected}\n"


# ---- train -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max-restarts", "-1"], "--max-restarts: must be >= 0 (0 = no restarts), got -1"),
        (
            ["--nproc", "2", "--max-restarts", "-3"],
            "--max-restarts: must be >= 0 (0 = no restarts), got -3",
        ),
        (["--nproc", "0"], "--nproc: must be >= 1 (local ranks to launch), got 0"),
        (["--nproc", "-2"], "--nproc: must be >= 1 (local ranks to launch), got -2"),
    ],
)
def test_train_launcher_flags_are_checked_before_any_launch(argv, expected, capsys, nothing_starts):
    assert_flag_error(*run(["train", "--config", "tiny-moe", *argv], capsys), expected)


def test_config_naming_a_folder_says_so(tmp_path, capsys, nothing_starts):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ConfigError, match=f"--config: {bare} is a folder; pass a TOML file or"):
        load_job(str(bare))
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "config.toml").write_text("[model]\nhidden = 16\nlayers = 2\nheads = 4\n")
    code, err = run(["train", "--config", str(run_folder)], capsys)
    assert_flag_error(
        code,
        err,
        f"--config: {run_folder} is a folder; pass a TOML file, e.g. "
        f"{run_folder / 'config.toml'} (its resolved config) or a preset name",
    )


# ---- generate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1, got -5"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
        (
            ["--temperature", "-1"],
            "--temperature: must be a finite number >= 0 (0 = greedy), got -1.0",
        ),
        (
            ["--temperature", "nan"],
            "--temperature: must be a finite number >= 0 (0 = greedy), got nan",
        ),
        (
            ["--temperature", "inf"],
            "--temperature: must be a finite number >= 0 (0 = greedy), got inf",
        ),
        (["--top-k", "-1"], "--top-k: must be >= 0 (0 = no top-k cut), got -1"),
    ],
)
def test_generate_flags_are_checked_before_the_checkpoint_is_read(argv, expected, tmp_path, capsys):
    code, err = run(["generate", "--checkpoint", str(tmp_path / "none"), *argv], capsys)
    assert_flag_error(code, err, expected)


def test_generate_temperature_zero_is_greedy_and_documented(tmp_path, capsys):
    code, err = run(
        ["generate", "--checkpoint", str(tmp_path / "none"), "--temperature", "0"], capsys
    )
    assert code == 2 and err.startswith("moefold: checkpoint error:"), err  # the flag passed
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "0 for greedy" in " ".join(capsys.readouterr().out.split())
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(hidden=16, layers=1, heads=2, kv_heads=2, ffn_hidden=8, vocab_size=13),
        MoEConfig(),
    ).eval()
    runs = [
        sample(model, [1, 2], 6, 0.0, 40, torch.Generator().manual_seed(seed), 16)
        for seed in (1, 2)
    ]
    ids = [1, 2]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert runs[0] == runs[1] == ids


# ---- plan --------------------------------------------------------------------------------------

PLAN = ["plan", "--model", "tiny-moe", "--gpus", "2", "--gpu", "h100", "--top", "1", "--json"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--global-batch", "0"],
            "--global-batch: must be >= 1, got 0; leave it out for the config's",
        ),
        (["--seq-len", "0"], "--seq-len: must be >= 1, got 0; leave it out for the config's"),
        (["--seq-len", "-8"], "--seq-len: must be >= 1, got -8; leave it out for the config's"),
        (["--nodes-of", "0"], "--nodes-of: must be >= 1, got 0; leave it out for the default"),
    ],
)
def test_plan_refuses_non_positive_sizes_instead_of_using_the_config(argv, expected, capsys):
    assert_flag_error(*run([*PLAN, *argv], capsys), expected)


def test_plan_uses_explicit_sizes(capsys):
    assert main([*PLAN, "--seq-len", "64", "--global-batch", "6"]) == 0
    query = json.loads(capsys.readouterr().out)["query"]
    assert (query["seq_len"], query["global_batch"]) == (64, 6)
    job = load_job("tiny-moe")
    assert (job.train.seq_len, job.train.global_batch) != (64, 6)


# ---- convert -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_convert_refuses_a_non_positive_shard_size(value, tmp_path, capsys):
    argv = ["convert", "--to-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]
    code, err = run([*argv, "--max-shard-gb", value], capsys)
    assert code == 2 and err == f"moefold: error: --max-shard-gb: must be > 0, got {float(value)}\n"
    assert list(tmp_path.iterdir()) == []
