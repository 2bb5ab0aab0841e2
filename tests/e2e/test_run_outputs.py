"""A real (tiny) training run: plain progress lines every train.log_every steps, the end-of-run
summary, and TensorBoard events with the MoE metrics."""

from __future__ import annotations

import logging

import pytest

from moefold.train.launch import run_training
from tests.e2e.test_train import tiny_job


def test_tiny_run_logs_lines_summary_and_moe_tensorboard(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="moefold")
    job = tiny_job(tmp_path, "train.steps=4", "train.log_every=3", "train.eval_every=0")
    rows = run_training(job, tmp_path / "run", "cpu")
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    assert "\r" not in captured.out + captured.err
    assert "preparing data" in text and "data ready in" in text
    assert "step 3/4 | loss" in text and "step 4/4 | loss" in text
    assert "step 1/4" not in text and "step 2/4" not in text  # log_every=3
    assert (
        f"done at step 4: loss {rows[-1]['loss']:.4f}, val loss {rows[-1]['val_loss']:.4f}" in text
    )
    assert "expert load over the last quarter" in text and "layer   1:" in text
    assert str(tmp_path / "run" / "checkpoints" / "step_00000004") in text

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0}
    )
    events.Reload()
    tags = events.Tags()
    assert {"expert_load/layer_0", "expert_load/layer_1"} <= set(tags["histograms"])
    assert "comm_bytes/ep" in tags["scalars"] and "dropped_frac/layer_1" in tags["scalars"]
    assert "loss" in tags["scalars"]  # MetricsWriter's top-level scalars, same folder
    assert [e.step for e in events.Histograms("expert_load/layer_0")] == [1, 2, 3, 4]
