"""Checkpoints and run folders that never execute, corrupt or lose anything (issue 28).

Crafted metadata never runs (resume, init_from, generate, convert --to-hf); garbled bytes are
named as damaged and resume=auto falls back; non-finite runs save nothing poisoned and keep the
last good checkpoint; a folder in use is refused; config.toml survives refused runs; a full
disk or an unusable --out is named with its path and OS cause, before any process group.
"""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from moefold.checkpoint import CheckpointError, list_checkpoints, write_manifest
from moefold.cli import main
from moefold.errors import CheckpointRefused, NonFiniteError, RunFolderError
from moefold.safe_io import RunLock
from moefold.testing.dist import run_ranks
from moefold.train.launch import run_training
from tests.e2e.test_fault_tolerance import trainer_in
from tests.e2e.test_train import TINY, losses, tiny_job


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One 4-step run with checkpoints at steps 2 and 4, shared (read-only) by the tests."""
    root = tmp_path_factory.mktemp("base")
    rows = run_training(tiny_job(root, "checkpoint.keep=3"), root / "run", "cpu")
    return {"root": root, "rows": rows, "checkpoints": root / "run" / "checkpoints"}


def copy_run(base, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base["checkpoints"], out / "checkpoints")
    return out


def craft_metadata(folder: Path, marker: Path) -> None:
    """A stealthy payload: unpickling it writes `marker`, then returns the real metadata so
    the command would go on and exit 0. The checksums are rewritten too, as an attacker would."""
    real = (folder / ".metadata").read_bytes()
    code = f"(open({str(marker)!r}, 'w').write('ran'), __import__('pickle').loads({real!r}))[1]"

    class Payload:
        def __reduce__(self):
            return (eval, (code,))

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    write_manifest(folder)


def test_crafted_payload_is_real(base, tmp_path):
    """The payload used below does run under plain pickle (what DCP's own reader uses)."""
    step = shutil.copytree(list_checkpoints(base["checkpoints"])[-1], tmp_path / "step")
    marker = tmp_path / "marker"
    craft_metadata(step, marker)
    metadata = pickle.loads((step / ".metadata").read_bytes())
    assert marker.exists() and type(metadata).__name__ == "Metadata"


def test_crafted_metadata_never_runs_on_resume(base, tmp_path):
    out = copy_run(base, tmp_path)
    newest = list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "marker"
    craft_metadata(newest, marker)
    with pytest.raises(CheckpointRefused, match=rf"{newest.name}/\.metadata: refused"):
        run_training(tiny_job(tmp_path, "train.steps=6"), out, "cpu")  # resume=auto
    assert not marker.exists()
    assert not (out / "config.toml").exists()  # refused before anything was written


def test_crafted_metadata_never_runs_on_init_from(base, tmp_path):
    step = shutil.copytree(list_checkpoints(base["checkpoints"])[-1], tmp_path / "step")
    marker = tmp_path / "marker"
    craft_metadata(step, marker)
    job = tiny_job(tmp_path, f"checkpoint.init_from={step}")
    with pytest.raises(CheckpointRefused, match=r"step/\.metadata: refused"):
        run_training(job, tmp_path / "fresh", "cpu")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["generate", "convert-to-hf"])
def test_crafted_metadata_never_runs_in_commands(base, tmp_path, capsys, command):
    step = shutil.copytree(list_checkpoints(base["checkpoints"])[-1], tmp_path / "step")
    marker = tmp_path / "marker"
    craft_metadata(step, marker)
    if command == "generate":
        argv = ["generate", "--checkpoint", str(step), "--max-new-tokens", "2"]
    else:
        argv = ["convert", "--to-hf", str(step), "--out", str(tmp_path / "hf")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ".metadata: refused" in err and str(step) in err
    assert not marker.exists()


def garble(path: Path) -> None:
    """Flip bytes in the middle of a file; its size stays the same."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def test_garbled_checkpoint_is_named_damaged_and_auto_falls_back(base, tmp_path, capfd):
    out = copy_run(base, tmp_path)
    newest = list_checkpoints(out / "checkpoints")[-1]
    data_file = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = data_file.stat().st_size
    garble(data_file)
    assert data_file.stat().st_size == size
    with pytest.raises(CheckpointError, match=rf"{data_file.name}: damaged"):
        run_training(tiny_job(tmp_path, f"checkpoint.resume={newest}"), tmp_path / "x", "cpu")
    capfd.readouterr()
    resumed = run_training(tiny_job(tmp_path), out, "cpu")  # auto: step 4 is damaged
    assert [r["step"] for r in resumed] == [3, 4]
    assert losses(resumed) == losses(base["rows"])[2:]
    # the warning reaches the console and train.log
    assert f"{data_file.name}: damaged" in capfd.readouterr().err
    assert f"{data_file.name}: damaged" in (out / "train.log").read_text()


def poisoned_run(rank, world_size, job, first_nan, last_nan):
    """trainer.train() with NaN gradients at steps first_nan..last_nan (1-based)."""
    trainer = trainer_in(rank, world_size, job)
    forward_backward = trainer.runner.forward_backward

    def poisoned(batches):
        loss = forward_backward(batches)
        if first_nan <= trainer.step + 1 <= last_nan:
            next(trainer.model.parameters()).grad.fill_(float("nan"))
        return loss

    trainer.runner.forward_backward = poisoned
    try:
        trainer.train()
    except NonFiniteError as error:
        return {"error": str(error), "out": str(trainer.out_dir)}
    return {"error": None, "out": str(trainer.out_dir)}


def strict_rows(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nonfinite_tail_saves_nothing_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "ck"
    job = tiny_job(
        tmp_path,
        "train.steps=6",
        "checkpoint.every=1",
        "checkpoint.keep=1",
        "train.max_skipped_steps=1",
        f"checkpoint.dir={ckpt}",
    )
    out = run_ranks(poisoned_run, 1, job, 3, 6)[0]  # NaN from step 3 on: cannot recover
    assert out["error"] and "2 in a row" in out["error"] and "step_00000002" in out["error"]
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000002"]
    rows = strict_rows(Path(out["out"]) / "metrics.jsonl")  # strict JSON despite the NaNs
    assert rows[2]["grad_norm"] is None and "grad_norm" in rows[2]["nonfinite"]
    assert rows[1]["grad_norm"] > 0 and "nonfinite" not in rows[1]


def test_skip_mode_exits_nonzero_when_the_last_step_is_nonfinite(tmp_path):
    ckpt = tmp_path / "ck"
    job = tiny_job(tmp_path, f"checkpoint.dir={ckpt}")  # skip, max_skipped_steps=10
    out = run_ranks(poisoned_run, 1, job, 4, 4)[0]
    assert out["error"] and "the last step (4) was non-finite" in out["error"]
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000002"]


def test_second_run_into_a_folder_in_use_stops_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunFolderError, match=rf"{out} is in use .*pid {os.getpid()} on"):
            run_training(tiny_job(tmp_path), out, "cpu")
    assert not (out / "config.toml").exists() and not (out / "metrics.jsonl").exists()


def test_refused_resume_and_zero_step_run_leave_config_toml(base, tmp_path):
    out = copy_run(base, tmp_path)
    original = "# the run's own config\n"
    (out / "config.toml").write_text(original)
    with pytest.raises(CheckpointError, match="different model"):
        run_training(tiny_job(tmp_path, "model.hidden=64"), out, "cpu")
    assert (out / "config.toml").read_text() == original
    assert run_training(tiny_job(tmp_path, "train.lr=0.001"), out, "cpu") == []  # at step 4
    assert (out / "config.toml").read_text() == original
    with pytest.raises(CheckpointError, match="past train.steps=3"):
        run_training(tiny_job(tmp_path, "train.steps=3"), out, "cpu")
    assert (out / "config.toml").read_text() == original


def test_disk_full_during_save_names_path_and_cause(base, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystem

    out = copy_run(base, tmp_path)
    real = FileSystem.create_stream

    def full_disk(self, path, mode):
        if str(path).endswith(".distcp") and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", full_disk)
    with pytest.raises(CheckpointError, match=r"\.distcp: No space left on device \(ENOSPC\)"):
        run_training(tiny_job(tmp_path, "train.steps=6"), out, "cpu")
    root = out / "checkpoints"
    assert not list(root.glob(".tmp-*"))  # the partial folder is gone
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000004"]


def test_unusable_out_is_named_before_any_process_group(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: started.append(a))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunFolderError, match=r"--out: .*file/run: Not a directory \(ENOTDIR\)"):
        run_training(tiny_job(tmp_path), blocker / "run", "cpu")
    monkeypatch.setattr(
        "moefold.safe_io.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1024)
    )
    with pytest.raises(RunFolderError, match="1024 bytes free|0.0 MiB free.*No space left"):
        run_training(tiny_job(tmp_path), tmp_path / "run", "cpu")
    assert started == []


def test_cli_train_exit_codes_for_run_folder_errors(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", "tiny-moe", "--out", str(out), "--device", "cpu"]
    argv += [
        arg for item in [*TINY, f"data.cache_dir={tmp_path / 'cache'}"] for arg in ("--set", item)
    ]
    with RunLock(out):
        assert main(argv) == 2
    assert "is in use by another moefold run" in capsys.readouterr().err
