"""Peak FLOPs: the CPU measurement cache and the GPU table, without CUDA."""

import json

import pytest
import torch

from moefold.train import peak
from moefold.train.peak import PeakFlops, device_peak_flops, gpu_peak_flops

TINY = dict(matmul_size=32, budget_s=0.0)  # three 32x32 matmuls: a benchmark in microseconds


def test_cpu_measurement_is_cached_and_read_back(tmp_path):
    first = device_peak_flops(torch.device("cpu"), torch.float32, str(tmp_path), **TINY)
    assert first.source.startswith("measured: ")
    assert first.flops_per_s > 0
    entries = json.loads((tmp_path / "peak.json").read_text())
    (key,) = entries
    assert f"threads={torch.get_num_threads()}" in key
    assert "|float32|" in key and f"torch={torch.__version__}" in key
    assert entries[key]["flops_per_s"] == first.flops_per_s

    # A later, slower measurement (a busy machine) never lowers the cached best figure.
    entries[key]["flops_per_s"] = first.flops_per_s * 1e6
    (tmp_path / "peak.json").write_text(json.dumps(entries))
    second = device_peak_flops(torch.device("cpu"), torch.float32, str(tmp_path), **TINY)
    assert second.source.startswith("cache: ")
    assert second.flops_per_s == first.flops_per_s * 1e6


def test_cache_keeps_one_entry_per_dtype_and_no_temp_files(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        device_peak_flops(torch.device("cpu"), dtype, str(tmp_path), **TINY)
    keys = json.loads((tmp_path / "peak.json").read_text())
    assert sorted("|float32|" in key for key in keys) == [False, True]
    assert [path.name for path in tmp_path.iterdir()] == ["peak.json"]


def test_corrupt_cache_is_measured_again_and_rewritten(tmp_path):
    (tmp_path / "peak.json").write_text("{not json")
    result = device_peak_flops(torch.device("cpu"), torch.float32, str(tmp_path), **TINY)
    assert result.source.startswith("measured: ")
    assert len(json.loads((tmp_path / "peak.json").read_text())) == 1


def test_cache_dir_is_created(tmp_path):
    folder = tmp_path / "a" / "b"
    device_peak_flops(torch.device("cpu"), torch.float32, str(folder), **TINY)
    assert (folder / "peak.json").is_file()


@pytest.mark.parametrize(
    ("name", "bf16_tflops", "tf32_tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4, 494.7),
        ("NVIDIA H100 PCIe", 756.0, 378.0),
        ("NVIDIA H100 NVL", 835.0, 417.5),
        ("NVIDIA GH200 480GB", 989.4, 494.7),
        ("NVIDIA H200", 989.4, 494.7),
        ("NVIDIA H200 NVL", 835.0, 417.5),
        ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
        ("NVIDIA A100-PCIE-40GB", 312.0, 156.0),
        ("NVIDIA A10", 125.0, 62.5),
        ("NVIDIA L40S", 362.05, 183.0),
        ("NVIDIA L40", 181.0, 90.5),
        ("NVIDIA L4", 121.0, 60.0),
        ("NVIDIA B200", 2250.0, 1100.0),
        ("NVIDIA GB200", 2500.0, 1250.0),
        ("NVIDIA GeForce RTX 4090", 165.2, 82.6),
    ],
)
def test_gpu_table_lookup_by_device_name(name, bf16_tflops, tf32_tflops):
    assert gpu_peak_flops(name, torch.bfloat16).flops_per_s == pytest.approx(bf16_tflops * 1e12)
    assert gpu_peak_flops(name, torch.float16).flops_per_s == pytest.approx(bf16_tflops * 1e12)
    assert gpu_peak_flops(name, torch.float32).flops_per_s == pytest.approx(tf32_tflops * 1e12)
    assert name in gpu_peak_flops(name, torch.bfloat16).source


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA H20", "Tesla V100-SXM2-16GB"])
def test_gpu_table_does_not_guess_similar_names(name):
    assert gpu_peak_flops(name, torch.bfloat16) is None


def test_cuda_device_uses_the_table_without_touching_cuda(monkeypatch):
    calls = []

    def fake_name(device):
        calls.append(device)
        return "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(torch.cuda, "get_device_name", fake_name)
    result = device_peak_flops(torch.device("cuda", 3), torch.bfloat16)
    assert result == PeakFlops(989.4e12, result.source)
    assert result.source.startswith("table: H100 SXM")
    assert calls == [torch.device("cuda", 3)]


def test_unknown_gpu_raises_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA Mystery 9000")
    with pytest.raises(ValueError, match="Mystery 9000.*_GPU_PEAKS"):
        device_peak_flops(torch.device("cuda"), torch.bfloat16)


def test_unsupported_dtype_and_device_raise():
    with pytest.raises(ValueError, match="dtype"):
        gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.int8)
    with pytest.raises(ValueError, match="meta"):
        device_peak_flops(torch.device("meta"), torch.float32)


def test_cpu_model_name_is_not_empty():
    assert peak.cpu_model_name()


def test_config_peak_wins_and_nothing_is_measured(tmp_path, monkeypatch):
    from moefold.config import TrainConfig

    monkeypatch.setattr(peak, "measure_matmul_flops", lambda *a, **k: pytest.fail("measured"))
    got = peak.mfu_peak(TrainConfig(peak_tflops=0.5), torch.device("cpu"), 128, str(tmp_path))
    assert got == PeakFlops(0.5e12, "config: train.peak_tflops")
    assert list(tmp_path.iterdir()) == []


def test_mfu_peak_measures_the_gemm_dtype_that_runs(tmp_path):
    from moefold.config import TrainConfig

    upcast = TrainConfig(dtype="bf16", bf16_gemm="fp32")  # bf16 GEMMs run as fp32 math
    got = peak.mfu_peak(upcast, torch.device("cpu"), 128, str(tmp_path))
    (key,) = json.loads((tmp_path / "peak.json").read_text())
    assert "|float32|" in key and got.flops_per_s > 0


def test_a_trainer_built_in_a_test_does_no_io(tmp_path, monkeypatch):
    """Trainer takes its MFU peak as an input: building one measures nothing, writes nothing."""
    from moefold.config import load_job
    from moefold.testing.dist import run_ranks

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda *a, **k: pytest.fail("measured"))
    job = load_job(
        "tiny-moe",
        ["model.layers=1", "train.steps=1", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    assert run_ranks(_build_trainer_body, 1, job, timeout=120) == [None]
    assert not (tmp_path / "home").exists()


def _build_trainer_body(rank, world_size, job):
    from moefold.parallel.layout import ParallelLayout
    from moefold.parallel.mesh import build_parallel_groups
    from moefold.testing.reference import build_test_trainer

    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    return build_test_trainer(job, groups).peak
