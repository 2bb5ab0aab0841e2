"""bf16 checkpoints keep the fp32 main parameters: resuming on the same layout continues the
uninterrupted bf16 run exactly (a resume from the bf16-rounded parameters would not), and a
resume under another layout stays within bf16 tolerance of the single process."""

import pytest
import torch

from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from moefold.testing.reference import build_test_trainer
from tests.equivalence.layouts import job_for, reference
from tests.equivalence.test_bf16 import BF16_LOSS_RTOL

STEPS, SAVE_AT = 5, 2
BF16 = ("train.dtype=bf16", f"train.steps={STEPS}")
ZERO1 = {"distributed_optimizer": "true"}


def bf16_body(rank, world_size, parallel: dict, stop_after: int, ckpt_dir: str):
    extra = (*BF16, f"checkpoint.dir={ckpt_dir}", "checkpoint.every=0", "train.eval_every=0")
    job = job_for(extra, parallel)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    trainer = build_test_trainer(job, groups)
    trainer.maybe_resume()
    rows = []
    while trainer.step < stop_after:
        rows.append(trainer.train_step())
    if stop_after < STEPS:
        trainer.save()
    return [row["loss"] for row in rows] if rank == 0 else None


@pytest.mark.dist
@pytest.mark.parametrize("parallel", [{}, ZERO1], ids=["dp2", "dp2-zero1"])
def test_bf16_resume_on_the_same_layout_is_exact(parallel, tmp_path):
    whole = run_ranks(bf16_body, 2, parallel, STEPS, str(tmp_path / "a"), timeout=900)[0]
    first = run_ranks(bf16_body, 2, parallel, SAVE_AT, str(tmp_path / "b"), timeout=900)[0]
    second = run_ranks(bf16_body, 2, parallel, STEPS, str(tmp_path / "b"), timeout=900)[0]
    assert first + second == whole


@pytest.mark.dist
def test_bf16_resume_under_another_layout(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = run_ranks(bf16_body, 4, {"tp": 2, "ep": 4, **ZERO1}, SAVE_AT, ckpt, timeout=900)[0]
    second = run_ranks(bf16_body, 4, {"pp": 2, "ep": 2}, STEPS, ckpt, timeout=900)[0]
    torch.testing.assert_close(
        torch.tensor(first + second, dtype=torch.float64),
        torch.tensor(reference(BF16)["losses"], dtype=torch.float64),
        rtol=BF16_LOSS_RTOL,
        atol=0,
    )
