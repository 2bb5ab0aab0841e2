"""TensorBoard and Weights & Biases loggers get the MoE metrics (expert load, drop, comm)."""

from __future__ import annotations

import json
import re
import time

import pytest

from moefold.train.loggers import ExperimentLoggers, moe_scalars


def _rows():
    return [
        {
            "step": step,
            "loss": 3.0 - step / 10,
            "lr": 1e-3,
            "tokens_per_s": 100.0,
            "expert_load": {"1": [300, 100, 0, 100]},  # mean 125
            "dropped_frac": {"1": 0.25},
            "comm_bytes": {"ep": 1000 * step, "dp": 0},
        }
        for step in (1, 2, 3)
    ]


def test_moe_scalars_flatten_load_drop_and_comm():
    tags = moe_scalars(_rows()[1])
    assert tags["expert_load_max/layer_1"] == pytest.approx(2.4)
    assert tags["expert_load_min/layer_1"] == 0.0
    assert tags["experts_dead/layer_1"] == 1.0
    assert tags["dropped_frac/layer_1"] == 0.25
    assert tags["comm_bytes/ep"] == 2000.0


def test_tensorboard_gets_expert_load_histograms_and_moe_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = ExperimentLoggers(tmp_path, enabled=True)
    for row in _rows():
        loggers.log(row)
    loggers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "expert_load/layer_1" in tags["histograms"]
    histogram = events.Histograms("expert_load/layer_1")[-1]
    assert histogram.step == 3 and histogram.histogram_value.num == 4
    assert histogram.histogram_value.max == pytest.approx(2.4)
    comm = events.Scalars("comm_bytes/ep")
    assert [(e.step, e.value) for e in comm] == [(1, 1000.0), (2, 2000.0), (3, 3000.0)]
    assert events.Scalars("dropped_frac/layer_1")[0].value == 0.25


def test_wandb_offline_run_logs_the_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loggers = ExperimentLoggers(tmp_path / "run", True, "moefold-test", {"train": {"lr": 1e-3}})
    for row in _rows():
        loggers.log(row)
    loggers.close()
    files = list(tmp_path.glob("run/wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # wandb's service process may still be writing the log after finish() returns
    for _ in range(120):
        found = _logged_values(files[0].read_bytes())
        if len(found.get("loss", [])) >= 3 and "values" in found:
            break
        time.sleep(0.5)
    # each value appears in its history record and again in the summary update
    history = {k: list(dict.fromkeys(v)) for k, v in found.items()}
    assert [float(v) for v in history["loss"]] == pytest.approx([2.9, 2.8, 2.7])
    assert [float(v) for v in history["comm_bytes/ep"]] == [1000.0, 2000.0, 3000.0]
    assert [float(v) for v in history["experts_dead/layer_1"]] == [1.0]
    # the histogram is logged under nested keys (expert_load/layer_1, values | bins | _type):
    # one count per bin, four experts in all
    assert b"\x13expert_load/layer_1\x12\x06values" in files[0].read_bytes()
    assert [sum(json.loads(v)) for v in history["values"]] == [4]


def _logged_values(data: bytes) -> dict[str, list[str]]:
    """key -> value_json strings of the history items in an offline run's .wandb file.

    wandb 0.31 ships no reader for its record log, so the items are found by their protobuf
    encoding: field 2 (key: 0x12, length, bytes) followed by field 16 (value_json: 0x82 0x01,
    varint length, bytes). Values here are short, so one-byte lengths are enough."""
    found: dict[str, list[str]] = {}
    for match in re.finditer(rb"\x12([\x01-\x7f])", data):
        start = match.end()
        key = data[start : start + match.group(1)[0]]
        rest = start + len(key)
        if data[rest : rest + 2] != b"\x82\x01" or not re.fullmatch(rb"[\w/.]+", key):
            continue
        length = data[rest + 2]
        if length >= 0x80:  # a two-byte varint (a histogram's JSON)
            length = (length & 0x7F) | (data[rest + 3] << 7)
            value = data[rest + 4 : rest + 4 + length]
        else:
            value = data[rest + 3 : rest + 3 + length]
        found.setdefault(key.decode(), []).append(value.decode(errors="replace"))
    return found
