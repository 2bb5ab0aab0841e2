"""A pruned checkpoint (unequal expert widths, stored zero-padded) loads under other parallel
layouts: the validation loss and the first training step's loss equal a single-process run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moefold.interop.hf import model_tensors, save_model_checkpoint
from moefold.model import build_model
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.prune.apply import PruneSpec, prune_in_place
from moefold.prune.pack import live_widths, pack
from moefold.testing.dist import run_ranks
from moefold.testing.reference import LOSS_RTOL, build_test_trainer
from tests.equivalence.layouts import job_for

MODEL = ("moe.ffn_hidden=32", "moe.shared_ffn_hidden=32", "train.eval_batches=4")


def _pruned_checkpoint(path: str) -> int:
    """Prune the seed model 60% (CAMERA) and save it; returns the stored expert width."""
    job = job_for(MODEL, {})
    model = build_model(job)
    with torch.no_grad():
        for param in model.parameters():  # larger weights than the 0.02 init: unequal widths
            param.mul_(10 if param.dim() > 1 else 1)
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    prune_in_place(model, PruneSpec(ratio=0.6), calib)
    packed = pack(model)
    widths = [w for layer in live_widths(packed).values() for w in layer["routed"]]
    assert len(set(widths)) > 1, widths
    job = dataclasses.replace(job, moe=packed.moe_cfg)
    save_model_checkpoint(model_tensors(packed), job, path)
    return packed.moe_cfg.ffn_hidden


def _body(rank: int, world_size: int, overrides: tuple, parallel: dict):
    job = job_for(overrides, parallel)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    trainer = build_test_trainer(job, groups)
    trainer.maybe_init_from()
    val_loss = trainer.evaluate()
    row = trainer.train_step()
    return (val_loss, row["loss"]) if rank == 0 else None


LAYOUTS = {
    "dp2__ep2": (2, {"ep": 2}),
    "tp2__etp2": (2, {"tp": 2, "etp": 2}),
    "pp2-dp2__pp2-ep2": (4, {"pp": 2, "ep": 2}),
}


@pytest.mark.dist
def test_pruned_checkpoint_loads_under_other_layouts(tmp_path):
    path = str(tmp_path / "pruned")
    width = _pruned_checkpoint(path)
    assert width % 2 == 0
    overrides = (*MODEL, f"moe.ffn_hidden={width}", f"checkpoint.init_from={path}")
    single = run_ranks(_body, 1, overrides, {}, timeout=300)[0]
    fresh = run_ranks(_body, 1, MODEL, {}, timeout=300)[0]
    assert abs(single[0] - fresh[0]) > 1e-3  # the pruned weights were loaded
    for name, (world, parallel) in LAYOUTS.items():
        got = run_ranks(_body, world, overrides, parallel, timeout=600)[0]
        for value, expected in zip(got, single, strict=True):
            assert value == pytest.approx(expected, rel=LOSS_RTOL), name
