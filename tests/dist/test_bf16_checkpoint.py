"""bf16 checkpoints keep the fp32 main parameters: resuming on the same layout continues the
uninterrupted bf16 run exactly (a resume from the bf16-rounded parameters would not), and a
resume under another layout stays within bf16 tolerance of the single process."""

import pytest
import torch

from moefold.testing.dist import run_ranks
from tests.dist.test_reshard import SAVE_AT, STEPS, train_body
from tests.equivalence.layouts import reference
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
