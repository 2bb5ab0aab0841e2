"""Checkpoints reshard: train k steps under layout A, resume under layout B, and the losses of
steps k+1..n equal an uninterrupted single-process run."""

import pytest
import torch

from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks
from moefold.testing.reference import LOSS_RTOL, build_test_trainer
from tests.equivalence.layouts import job_for, reference

STEPS, SAVE_AT = 5, 2


def train_body(
    rank, world_size, parallel: dict, stop_after: int, ckpt_dir: str, overrides: tuple = ()
):
    """Train (resuming from ckpt_dir if it has a checkpoint) and stop after `stop_after` steps,
    saving there: the schedule is always the 5-step one. Returns rank 0's (step, loss) rows."""
    extra = (
        f"train.steps={STEPS}",
        f"checkpoint.dir={ckpt_dir}",
        "checkpoint.every=0",
        "train.eval_every=0",
        *overrides,
    )
    job = job_for(extra, parallel)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    trainer = build_test_trainer(job, groups)
    trainer.maybe_resume()
    rows = []
    while trainer.step < stop_after:
        rows.append(trainer.train_step())
    trainer.save()
    return [(row["step"], row["loss"]) for row in rows] if rank == 0 else None


ZERO1 = {"distributed_optimizer": "true"}
PAIRS = {
    "dp4-zero1->dp2-zero1": ((4, ZERO1), (2, ZERO1)),
    "tp2-dp2__ep4-zero1->pp2-dp2__pp2-ep2": (
        (4, {"tp": 2, "ep": 4, **ZERO1}),
        (4, {"pp": 2, "ep": 2}),
    ),
    "pp2-tp2__pp2-ep2->dp4__ep4": ((4, {"pp": 2, "tp": 2, "ep": 2}), (4, {"ep": 4})),
    "dp2__ep2->pp2-cp2__pp2-ep2-etp2": ((2, {"ep": 2}), (8, {"pp": 2, "cp": 2, "ep": 2, "etp": 2})),
    "tp2-dp2__ep4->dp1": ((4, {"tp": 2, "ep": 4}), (1, {})),
    "dp4__ep4->dp4__ep2-etp2": ((4, {"ep": 4}), (4, {"ep": 2, "etp": 2})),
    "world8-tp2-cp2__ep8->world2-tp2": ((8, {"tp": 2, "cp": 2, "ep": 8}), (2, {"tp": 2})),
    "dp1->dp2__ep2-allgather": ((1, {}), (2, {"ep": 2, "dispatcher": "allgather"})),
    "dp4__etp4->cp2-dp2__ep4": ((4, {"etp": 4}), (4, {"cp": 2, "ep": 4})),
    "tp4__ep2-etp2->tp2-dp2__ep2": ((4, {"tp": 4, "ep": 2, "etp": 2}), (4, {"tp": 2, "ep": 2})),
}


@pytest.mark.dist
@pytest.mark.parametrize("pair", PAIRS, ids=list(PAIRS))
def test_resume_under_another_layout_matches_single_process(pair, tmp_path):
    (world_a, layout_a), (world_b, layout_b) = PAIRS[pair]
    ckpt = str(tmp_path / "ckpt")
    first = run_ranks(train_body, world_a, layout_a, SAVE_AT, ckpt, timeout=900)[0]
    second = run_ranks(train_body, world_b, layout_b, STEPS, ckpt, timeout=900)[0]
    assert [step for step, _ in first] == [1, 2]
    assert [step for step, _ in second] == [3, 4, 5]
    ref = reference((f"train.steps={STEPS}",))["losses"]
    got = [loss for _, loss in first + second]
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(ref, dtype=torch.float64),
        rtol=LOSS_RTOL,
        atol=0,
    )
