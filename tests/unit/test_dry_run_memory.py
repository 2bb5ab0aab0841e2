"""What the dry run's activation peak counts, and the pipeline's last stage not keeping every
micro-batch's logits."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moefold.config import load_job
from moefold.dryrun.routing import RoutingOverride
from moefold.dryrun.step import run_rank
from moefold.dryrun.tracker import StepMemory


def test_views_of_existing_storages_are_not_new():
    with FakeTensorMode():
        weight = torch.randn(256, 512)
        x = torch.randn(8, 512)
        tracker = StepMemory()
        tracker.ignore([weight])
        with tracker:
            out = x @ weight.t()  # the transpose is a view of the weight, not an allocation
        assert tracker.peak() == out.untyped_storage().nbytes() == 8 * 256 * 4
        assert [size for _, size in tracker.live_at_peak()] == [8 * 256 * 4]


def test_last_stage_peak_does_not_grow_with_the_micro_batches():
    """pp = 2, 1F1B: the last stage holds one micro-batch in flight whatever their number.
    The schedule used to keep every micro-batch's logits (and their concatenation) for a
    merged output nobody read: 37 GiB on Qwen2-57B's last stage."""
    peaks = []
    for global_batch in (8, 32):
        job = load_job(
            "tiny-moe",
            [
                "parallel.pp=2",
                "train.micro_batch=1",
                f"train.global_batch={global_batch}",
                "model.vocab_size=8192",  # logits dominate: 4 KiB per token
            ],
        )
        row = run_rank(job, 2, 1, RoutingOverride())
        assert row.pp_rank == 1
        peaks.append(row.memory_bytes["activations_peak"])
    assert peaks[1] < 1.1 * peaks[0]
