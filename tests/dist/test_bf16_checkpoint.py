"""bf16 checkpoints keep the fp32 main parameters: resuming on the same layout continues the
uninterrupted bf16 run exactly (a resume from the bf16-rounded parameters would not), and a
resume under another layout stays within bf16 tolerance of the single process; a run started
from a checkpoint's weights (init_from) steps from them."""

import pytest
import torch

from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from moefold.testing.reference import build_test_trainer
from tests.dist.test_reshard import SAVE_AT, STEPS, train_body
from tests.equivalence.layouts import job_for, reference
from tests.equivalence.test_bf16 import BF16_LOSS_RTOL

BF16 = ("train.dtype=bf16",)
ZERO1 = {"distributed_optimizer": "true"}


def bf16_losses(world_size, parallel: dict, stop_after: int, ckpt_dir: str) -> list[float]:
    """The reshard tests' train-resume-save body in bf16; rank 0's losses."""
    rows = run_ranks(train_body, world_size, parallel, stop_after, ckpt_dir, BF16, timeout=900)[0]
    return [loss for _, loss in rows]


@pytest.mark.dist
@pytest.mark.parametrize("parallel", [{}, ZERO1], ids=["dp2", "dp2-zero1"])
def test_bf16_resume_on_the_same_layout_is_exact(parallel, tmp_path):
    whole = bf16_losses(2, parallel, STEPS, str(tmp_path / "a"))
    first = bf16_losses(2, parallel, SAVE_AT, str(tmp_path / "b"))
    second = bf16_losses(2, parallel, STEPS, str(tmp_path / "b"))
    assert first + second == whole


@pytest.mark.dist
def test_bf16_resume_under_another_layout(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = bf16_losses(4, {"tp": 2, "ep": 4, **ZERO1}, SAVE_AT, ckpt)
    second = bf16_losses(4, {"pp": 2, "ep": 2}, STEPS, ckpt)
    torch.testing.assert_close(
        torch.tensor(first + second, dtype=torch.float64),
        torch.tensor(reference((*BF16, f"train.steps={STEPS}"))["losses"], dtype=torch.float64),
        rtol=BF16_LOSS_RTOL,
        atol=0,
    )


def init_from_body(rank, world_size, parallel: dict, source: str):
    """One bf16 step at a tiny learning rate from the weights of `source` (another seed's run):
    rank 0's relative change of the weights over that step (stale fp32 main parameters would
    put back this run's own random initialisation)."""
    overrides = (f"checkpoint.init_from={source}", "train.eval_every=0", "train.lr=1e-7")
    job = job_for((*BF16, *overrides), parallel)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    trainer = build_test_trainer(job, groups)
    trainer.maybe_init_from()
    loaded = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    moved = sum(
        (p.detach().float() - loaded[n]).pow(2).sum() for n, p in trainer.model.named_parameters()
    )
    return (moved / sum(v.pow(2).sum() for v in loaded.values())).sqrt().item()


@pytest.mark.dist
@pytest.mark.parametrize("parallel", [{}, ZERO1], ids=["dp2", "dp2-zero1"])
def test_bf16_init_from_starts_at_the_loaded_weights(parallel, tmp_path):
    source = str(tmp_path / "source")
    run_ranks(train_body, 1, {}, 1, source, (*BF16, "train.seed=7"), timeout=900)
    moved = run_ranks(init_from_body, 2, parallel, source, timeout=900)[0]
    assert moved < 1e-3  # 0.41 with the stale main parameters
