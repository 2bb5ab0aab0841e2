"""Run-folder safety without process groups: the lock, atomic writes, OS-error messages,
strict metrics rows, safe checkpoint metadata, heartbeats and the collective timeout."""

import errno
import io
import json
import logging
import os
import pickle
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moefold.checkpoint import read_metadata
from moefold.checkpoint.safe_load import SafeLoadPlanner
from moefold.config import ConfigError, load_job
from moefold.errors import CheckpointRefused, RunFolderError
from moefold.safe_io import LOCK_FILE, RunLock, atomic_write_text, find_os_error
from moefold.train.heartbeat import Heartbeat, stalled_ranks
from moefold.train.launch import Launch, init_distributed
from moefold.train.metrics import MetricsWriter, strict_json_row

# ---- the run-folder lock ---------------------------------------------------------------------


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderError) as raised:
            RunLock(tmp_path).acquire()
    message = str(raised.value)
    assert str(tmp_path) in message and f"pid {os.getpid()} on host" in message
    RunLock(tmp_path).acquire().release()  # released: free again


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    dead = {"pid": 2**22 + 12345, "host": "gone", "since": 0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(dead))
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()


# ---- atomic writes and OS errors ---------------------------------------------------------------


def test_atomic_write_names_path_and_cause_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "config.toml"
    target.write_text("old")

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(RunFolderError, match=r"config.toml: No space left on device \(ENOSPC\)"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_os_error_is_found_under_dcp_wrapping():
    inner = OSError(errno.EACCES, "Permission denied", "/x/__0_0.distcp")
    try:
        try:
            raise inner
        except OSError as error:
            raise RuntimeError("unexpected pos 704 vs 598") from error
    except RuntimeError as outer:
        assert find_os_error(outer) is inner


# ---- metrics.jsonl is strict JSON ------------------------------------------------------------


def test_metrics_rows_are_strict_json_with_nonfinite_flags(tmp_path):
    row = {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "mfu": 0.5}
    row["dropped_frac"] = {"1": float("-inf"), "2": 0.0}
    writer = MetricsWriter(tmp_path, True)
    writer.write(row)
    writer.close()

    def refuse(name):
        raise ValueError(name)

    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    parsed = json.loads(line, parse_constant=refuse)
    assert parsed["loss"] is None and parsed["grad_norm"] is None and parsed["mfu"] == 0.5
    assert parsed["dropped_frac"] == {"1": None, "2": 0.0}
    assert parsed["nonfinite"] == ["loss", "grad_norm", "dropped_frac.1"]
    assert "nonfinite" not in strict_json_row({"step": 1, "loss": 2.0})


def test_metrics_disk_full_names_the_file(tmp_path, monkeypatch):
    writer = MetricsWriter(tmp_path, True)

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(RunFolderError, match=r"metrics.jsonl: No space left on device"):
        writer.write({"step": 1, "loss": 1.0})


# ---- checkpoint metadata and entries never run code ------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').write('ran')",))


def test_metadata_reader_refuses_any_other_global(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(str(tmp_path / "marker"))))
    with pytest.raises(CheckpointRefused, match=r"\.metadata: refused .*builtins\.eval"):
        read_metadata(tmp_path)
    assert not (tmp_path / "marker").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_metadata_reader_accepts_real_metadata_and_refuses_outside_paths(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "n": 7}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    metadata = read_metadata(tmp_path)
    assert metadata.state_dict_metadata["b"].properties.dtype == torch.bfloat16
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointRefused, match="outside the checkpoint folder"):
        read_metadata(tmp_path)


def test_pickled_entries_load_weights_only(tmp_path):
    class Item:
        class dest_index:  # noqa: N801 - mimics DCP's ReadItem
            fqn = "optim.x.step"

    planner = SafeLoadPlanner()
    buffer = io.BytesIO()
    torch.save(_Payload(str(tmp_path / "marker")), buffer)
    buffer.seek(0)
    with pytest.raises(CheckpointRefused, match="optim.x.step: refused"):
        planner.load_bytes(Item(), buffer)
    assert not (tmp_path / "marker").exists()


# ---- heartbeats ------------------------------------------------------------------------------


def test_stalled_ranks_reports_a_silent_rank_once_by_rank_and_step():
    seen = {}
    beats = {0: {"count": 1, "step": 7}, 1: {"count": 1, "step": 7}}
    assert stalled_ranks(seen, beats, now=0.0, stall_s=10) == []
    beats = {0: {"count": 5, "step": 8}, 1: {"count": 1, "step": 7}}
    assert stalled_ranks(seen, beats, now=9.0, stall_s=10) == []
    reported = stalled_ranks(seen, beats, now=10.5, stall_s=10)
    assert [(rank, beat["step"]) for rank, beat, _ in reported] == [(1, 7)]
    beats = {0: {"count": 9, "step": 8}, 1: {"count": 1, "step": 7}}
    assert stalled_ranks(seen, beats, now=30.0, stall_s=10) == []  # once per silence


def test_watchdog_logs_a_rank_whose_heartbeat_stops(tmp_path, caplog):
    folder = tmp_path / ".heartbeat"
    watcher = Heartbeat(folder, 0, 2, lambda: 5, stall_s=0.2, watch=True)
    silent = Heartbeat(folder, 1, 2, lambda: 7, stall_s=0.2, watch=False)
    with caplog.at_level(logging.ERROR, logger="moefold.train.heartbeat"):
        silent.start()
        silent.stop()  # rank 1 "hangs" after its first beats
        watcher.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "rank 1" not in caplog.text:
                time.sleep(0.05)
        finally:
            watcher.stop()
    assert "rank 1 (pid" in caplog.text and "at step 7" in caplog.text
    assert "rank 0" not in caplog.text


# ---- the collective timeout ------------------------------------------------------------------


def test_parallel_timeout_reaches_init_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(k))
    init_distributed(torch.device("cpu"), Launch(), timeout_s=7)
    assert calls[0]["timeout"] == timedelta(seconds=7)
    job = load_job("tiny-moe", ["parallel.timeout_s=42"])
    assert job.parallel.timeout_s == 42 and job.parallel.heartbeat_s == 60
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        load_job("tiny-moe", ["parallel.timeout_s=0"])
    with pytest.raises(ConfigError, match="parallel.heartbeat_s"):
        load_job("tiny-moe", ["parallel.heartbeat_s=-1"])
