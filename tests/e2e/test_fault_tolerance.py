"""Surviving failures: non-finite steps, corrupt checkpoints, a kill while saving, and a rank
SIGKILLed under torchrun --max-restarts."""

import json
import os
import signal

import pytest
import torch

from moefold.checkpoint import CheckpointError, list_checkpoints
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import RanksFailed, run_ranks
from moefold.testing.reference import build_test_trainer
from tests.e2e.kill_harness import kill_rank_one_after_step_five, moefold_train
from tests.e2e.test_train import losses, tiny_job


def trainer_in(rank, world_size, job):
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    return build_test_trainer(job, groups)


def nan_body(rank, world_size, job, nan_step):
    trainer = trainer_in(rank, world_size, job)
    forward_backward = trainer.runner.forward_backward

    def poisoned(batches):
        loss = forward_backward(batches)
        if trainer.step + 1 == nan_step:
            next(trainer.model.parameters()).grad.fill_(float("nan"))
        return loss

    trainer.runner.forward_backward = poisoned
    rows, before = [], None
    try:
        while trainer.step < job.train.steps:
            if trainer.step + 1 == nan_step:
                before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            rows.append(trainer.train_step())
            if trainer.step == nan_step:
                unchanged = all(
                    torch.equal(before[n], p) for n, p in trainer.model.named_parameters()
                )
    except FloatingPointError as error:
        return {"error": str(error), "rows": rows}
    return {"rows": rows, "unchanged": unchanged}


def test_nonfinite_gradient_skips_the_step(tmp_path):
    job = tiny_job(tmp_path, "checkpoint.every=0")
    out = run_ranks(nan_body, 2, job, 2)[0]
    assert out["unchanged"], "a NaN gradient must not reach the weights"
    assert [r["skipped_steps"] for r in out["rows"]] == [0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in out["rows"])


def test_nonfinite_stop_saves_nothing_and_raises(tmp_path):
    job = tiny_job(tmp_path, "train.nonfinite=stop", f"checkpoint.dir={tmp_path / 'ck'}")
    out = run_ranks(nan_body, 1, job, 3)[0]
    assert "non-finite" in out["error"] and "train.nonfinite=stop" in out["error"]
    assert "stopped without saving" in out["error"]
    assert list_checkpoints(tmp_path / "ck") == []  # the weights that gave a NaN are not kept


def test_corrupt_newest_checkpoint_falls_back_to_older(tmp_path):
    ckpt = tmp_path / "ck"
    full = losses(run_training_rows(tmp_path, "full", ()))
    run_training_rows(
        tmp_path, "part", ("train.steps=4", f"checkpoint.dir={ckpt}", "checkpoint.keep=3")
    )
    newest = list_checkpoints(ckpt)[-1]
    data_file = next(newest.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=newest.name):
        run_training_rows(
            tmp_path, "explicit", (f"checkpoint.resume={newest}", f"checkpoint.dir={ckpt}")
        )
    resumed = run_training_rows(tmp_path, "part", (f"checkpoint.dir={ckpt}",))
    assert [r["step"] for r in resumed] == [3, 4]  # from step 2, not the corrupt step 4
    assert losses(resumed) == full[2:]


def run_training_rows(tmp_path, name, extra):
    from moefold.train.launch import run_training

    return run_training(tiny_job(tmp_path, *extra), tmp_path / name, "cpu")


def killed_while_saving(rank, world_size, job):
    import moefold.checkpoint as checkpoint

    trainer = trainer_in(rank, world_size, job)
    trainer.train_step(), trainer.train_step()
    trainer.save()
    trainer.train_step(), trainer.train_step()
    real_save = checkpoint.dcp.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)  # the data files are written, the rename never happens
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.dcp.save = save_then_die
    trainer.save()


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ck"
    job = tiny_job(tmp_path, f"checkpoint.dir={ckpt}", "checkpoint.every=0")
    with pytest.raises(RanksFailed):
        run_ranks(killed_while_saving, 1, job)
    assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000002"]
    assert (ckpt / ".tmp-step_00000004").exists()
    full = losses(run_training_rows(tmp_path, "full", ()))
    resumed = run_training_rows(tmp_path, "again", (f"checkpoint.dir={ckpt}",))
    assert losses(resumed) == full[2:]
    assert not (ckpt / ".tmp-step_00000004").exists()


@pytest.mark.slow
def test_sigkilled_rank_restarts_and_matches_uninterrupted_run(tmp_path):
    got, want, _ = kill_rank_one_after_step_five(
        tmp_path, lambda restarts: moefold_train("--nproc", "4", "--max-restarts", str(restarts))
    )
    assert got == want
    assert (
        json.loads(
            (list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "trainer.json").read_text()
        )["step"]
        == 8
    )
