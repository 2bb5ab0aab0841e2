"""Peak matmul throughput of a device: the denominator of model FLOPs utilization (MFU).

CUDA devices are looked up by name in a table of NVIDIA datasheet peaks: dense tensor-core
throughput (no 2:4 sparsity), where bf16/fp16 means 16-bit inputs with fp32 accumulation and fp32
means TF32 tensor cores (the figure MFU reports use; strict IEEE fp32 matmuls run about 8x
slower).
CPUs have no datasheet figure that torch reaches, so the peak is measured once with a square
matmul benchmark at the current `torch.get_num_threads()` and cached in a JSON file keyed by CPU
model, thread count, dtype, matmul size and torch version. Nothing touches CUDA at import time.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moefold.config import TrainConfig
from moefold.kernels.gemm import resolve_bf16_gemm, upcasts_bf16

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeakFlops:
    """A peak rate and where it came from (a table entry, a measurement or the cache)."""

    flops_per_s: float
    source: str


# (name pattern, label, dense bf16/fp16 TFLOPS, dense TF32 TFLOPS), from NVIDIA datasheets.
# Patterns are searched case-insensitively in torch.cuda.get_device_name(); the first match wins,
# so more specific names (H100 PCIe, H200 NVL) come before the family default.
_GPU_PEAKS: tuple[tuple[str, str, float, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0, 378.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.0, 417.5),
    (r"\bH100\b", "H100 SXM", 989.4, 494.7),
    (r"\bGH200\b", "GH200", 989.4, 494.7),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.0, 417.5),
    (r"\bH200\b", "H200 SXM", 989.4, 494.7),
    (r"\bGB200\b", "GB200", 2500.0, 1250.0),
    (r"\bB200\b", "B200", 2250.0, 1100.0),
    (r"\bA100\b", "A100", 312.0, 156.0),
    (r"\bA10\b", "A10", 125.0, 62.5),
    (r"\bL40S\b", "L40S", 362.05, 183.0),
    (r"\bL40\b", "L40", 181.0, 90.5),
    (r"\bL4\b", "L4", 121.0, 60.0),
    (r"\bRTX 4090\b", "GeForce RTX 4090", 165.2, 82.6),
    (r"\bRTX 3090\b", "GeForce RTX 3090", 71.0, 35.6),
)

_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (*_HALF_DTYPES, torch.float32):
        raise ValueError(f"dtype: no peak for {dtype}; use torch.bfloat16, float16 or float32")


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> PeakFlops | None:
    """Look up a GPU by its CUDA device name; None when the table does not know it.

    Args:
        device_name: what torch.cuda.get_device_name() returns, e.g. "NVIDIA H100 80GB HBM3".
        dtype: matmul input dtype (bf16/fp16 tensor cores, or fp32 as TF32).
    """
    _check_dtype(dtype)
    for pattern, label, half_tflops, tf32_tflops in _GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            tflops = half_tflops if dtype in _HALF_DTYPES else tf32_tflops
            kind = "dense bf16/fp16" if dtype in _HALF_DTYPES else "dense TF32"
            return PeakFlops(tflops * 1e12, f"table: {label} {kind} ({device_name})")
    return None


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor() or the machine type."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def measure_matmul_flops(
    dtype: torch.dtype, *, matmul_size: int = 2048, budget_s: float = 0.6
) -> float:
    """Best observed rate of an (n x n) @ (n x n) matmul on the CPU, in FLOP/s.

    Runs one untimed warm-up, then timed matmuls until `budget_s` has passed (at least three),
    and keeps the fastest: the peak is what the machine can do, not what a noisy neighbour
    leaves it.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(matmul_size, matmul_size, generator=generator).to(dtype)
    b = torch.randn(matmul_size, matmul_size, generator=generator).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    start, runs = time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < budget_s:
        tic = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - tic)
        runs += 1
    return 2 * matmul_size**3 / best


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or corrupt: measure again and overwrite
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache_atomically(path: Path, entries: dict[str, dict]) -> None:
    # Write a temp file in the same folder, then rename over the old one: a concurrent reader
    # (another rank) sees either the old or the new file, never a half-written one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as tmp:
            json.dump(entries, tmp, indent=2, sort_keys=True)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def cpu_peak_flops(
    dtype: torch.dtype,
    cache_dir: str | None = None,
    *,
    matmul_size: int = 2048,
    budget_s: float = 0.6,
) -> PeakFlops:
    """Measured CPU matmul peak at the current thread count, cached in cache_dir/peak.json.

    Every call measures again (about budget_s seconds) and keeps the best figure ever seen:
    on a shared machine one measurement can read far below the real peak (41.7 instead of
    ~180 GFLOP/s fp32 was seen here under load), which would inflate MFU for good.
    """
    _check_dtype(dtype)
    folder = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "moefold"
    path = folder / "peak.json"
    threads = torch.get_num_threads()
    dtype_name = str(dtype).removeprefix("torch.")
    key = "|".join(
        [
            cpu_model_name(),
            f"threads={threads}",
            dtype_name,
            f"n={matmul_size}",
            f"torch={torch.__version__}",
        ]
    )
    entries = _read_cache(path)
    cached = entries.get(key)
    logger.info("measuring CPU %s matmul peak (n=%d, %d threads)", dtype_name, matmul_size, threads)
    flops = measure_matmul_flops(dtype, matmul_size=matmul_size, budget_s=budget_s)
    if isinstance(cached, dict) and isinstance(cached.get("flops_per_s"), (int, float)):
        if float(cached["flops_per_s"]) >= flops:
            return PeakFlops(float(cached["flops_per_s"]), f"cache: {path} [{key}]")
    entries[key] = {"flops_per_s": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_cache_atomically(path, entries)
    return PeakFlops(flops, f"measured: {key}")


def device_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: str | None = None,
    *,
    matmul_size: int = 2048,
    budget_s: float = 0.6,
) -> PeakFlops:
    """Peak matmul FLOP/s of `device` for `dtype` inputs.

    Args:
        device: a cuda or cpu device.
        dtype: matmul input dtype: torch.bfloat16, torch.float16 or torch.float32.
        cache_dir: folder of the CPU measurement cache peak.json; None = ~/.cache/moefold.
        matmul_size: side of the square CPU benchmark matmul (tests pass a tiny one).
        budget_s: seconds of timed CPU matmuls per measurement.

    Raises:
        ValueError: an unsupported dtype or device type, or a GPU missing from the table.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is None:
            raise ValueError(
                f"device: no peak FLOPs known for GPU '{name}'; add its datasheet figures to "
                "_GPU_PEAKS in moefold/train/peak.py"
            )
        return peak
    if device.type == "cpu":
        return cpu_peak_flops(dtype, cache_dir, matmul_size=matmul_size, budget_s=budget_s)
    raise ValueError(f"device: peak FLOPs are known for cuda and cpu devices, not '{device.type}'")


def mfu_peak(
    train: TrainConfig, device: torch.device, hidden: int, cache_dir: str | None = None
) -> PeakFlops | None:
    """The MFU denominator of one device for a run: `train.peak_tflops` when set, else the
    datasheet (GPU) or the cached measurement (CPU) for the GEMM dtype that actually runs (bf16
    GEMMs upcast to fp32 on CPUs without bf16 units, kernels/gemm.py). None, with a warning, for
    a GPU missing from the table: the run trains and reports MFU as NaN."""
    if train.peak_tflops > 0:
        return PeakFlops(train.peak_tflops * 1e12, "config: train.peak_tflops")
    dtype = torch.bfloat16 if train.dtype == "bf16" else torch.float32
    gemm_mode = resolve_bf16_gemm(train.bf16_gemm, device, hidden)
    if dtype == torch.bfloat16 and upcasts_bf16(device, gemm_mode):
        dtype = torch.float32
    try:
        return device_peak_flops(device, dtype, cache_dir)
    except ValueError as error:
        logger.warning("MFU unavailable: %s; set train.peak_tflops", error)
        return None
