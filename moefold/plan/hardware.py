"""Device and network specs the planner's cost model runs on: datasheet GPUs and a measured CPU.

A `Device` is one accelerator plus the links it sees: NVLink (or shared memory) to the other
devices of its node and a network port to other nodes. GPU figures are datasheet numbers (peak
matmul FLOP/s from moefold/train/peak.py, the same table MFU divides by); the cost model applies
its own achievable-fraction constants on top (docs/planner.md). The CPU device is measured once
on this machine (matmul peak through `device_peak_flops`, gloo bandwidth and latency between two
local ranks, memory bandwidth, the per-op cost of eager PyTorch and the process's runtime memory)
and cached in `~/.cache/moefold/plan_cpu.json`, like the matmul peak itself.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moefold.train.peak import cpu_model_name, device_peak_flops, gpu_peak_flops

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device (GPU or CPU rank) and its links; all rates per device, per direction."""

    name: str
    peak_flops: float  # dense matmul peak, FLOP/s, in the training dtype (the MFU denominator)
    memory_bytes: float  # memory one device (rank) may use
    memory_bandwidth: float  # HBM / DRAM bytes/s, for memory-bound (elementwise) work
    intra_node_bandwidth: float  # NVLink (or shared memory) bytes/s to devices of the same node
    inter_node_bandwidth: float  # network bytes/s to other nodes (one NIC per GPU)
    intra_node_latency: float  # seconds per collective call inside a node
    inter_node_latency: float  # seconds per collective call across nodes
    gpus_per_node: int  # default --nodes-of
    gemm_efficiency: float  # best achievable fraction of peak for large GEMMs
    gemm_half_dim: float  # GEMM dimension at which that dimension alone halves the efficiency
    op_overhead: float  # seconds of fixed cost per kernel launch / eager op
    runtime_memory_bytes: float  # per-rank memory outside the model: CUDA context, NCCL, runtime
    overlap: bool  # the runtime overlaps communication with compute (Megatron-class GPU stacks)
    source: str = ""  # where the numbers come from


# name -> (peak-table device name, memory MiB, HBM bytes/s, NVLink bytes/s per direction,
#          network bytes/s per GPU, GPUs per node). Datasheet figures.
_GPUS: dict[str, tuple[str, float, float, float, float, int]] = {
    "h100": ("NVIDIA H100 80GB HBM3", 81559, 3.35e12, 450e9, 400e9 / 8, 8),
    "h200": ("NVIDIA H200", 143771, 4.8e12, 450e9, 400e9 / 8, 8),
    "a100": ("NVIDIA A100-SXM4-80GB", 81920, 2.039e12, 300e9, 200e9 / 8, 8),
    "b200": ("NVIDIA B200", 183359, 8.0e12, 900e9, 400e9 / 8, 8),
    "gb200": ("NVIDIA GB200", 189471, 8.0e12, 900e9, 400e9 / 8, 72),
}

# Fitted once on the two H100 calibration points of the MoE Parallel Folding paper
# (docs/planner.md, "Calibration"); used for every GPU.
GPU_GEMM_EFFICIENCY = 0.90
GPU_GEMM_HALF_DIM = 256.0
GPU_OP_OVERHEAD = 4e-6
GPU_RUNTIME_MEMORY = 6 * GIB  # CUDA context, NCCL and cuBLAS workspaces, allocator slack
NVLINK_LATENCY = 3e-6  # per ring step
NETWORK_LATENCY = 6e-6


def device_names() -> list[str]:
    """Names accepted by `get_device` (the --gpu choices)."""
    return [*_GPUS, "cpu"]


def gpu_device(name: str, dtype: torch.dtype = torch.bfloat16) -> Device:
    """The datasheet spec of a GPU; `dtype` picks the peak (bf16/fp16 or fp32 as TF32)."""
    key = name.lower()
    if key not in _GPUS:
        raise ValueError(f"--gpu: unknown device '{name}'; choose one of {', '.join(device_names())}")
    table_name, memory_mib, hbm, nvlink, network, per_node = _GPUS[key]
    peak = gpu_peak_flops(table_name, dtype)
    assert peak is not None, table_name
    return Device(
        name=key,
        peak_flops=peak.flops_per_s,
        memory_bytes=memory_mib * MIB,
        memory_bandwidth=hbm,
        intra_node_bandwidth=nvlink,
        inter_node_bandwidth=network,
        intra_node_latency=NVLINK_LATENCY,
        inter_node_latency=NETWORK_LATENCY,
        gpus_per_node=per_node,
        gemm_efficiency=GPU_GEMM_EFFICIENCY,
        gemm_half_dim=GPU_GEMM_HALF_DIM,
        op_overhead=GPU_OP_OVERHEAD,
        runtime_memory_bytes=GPU_RUNTIME_MEMORY,
        overlap=True,
        source=peak.source,
    )


def get_device(
    name: str, dtype: torch.dtype = torch.bfloat16, *, ranks_per_node: int = 1,
    cache_dir: str | None = None,
) -> Device:
    """A GPU from the datasheet table, or this machine's CPU (measured once, then cached).

    Args:
        name: one of device_names().
        dtype: training dtype; sets the peak (and, on CPU, the matmul benchmark dtype).
        ranks_per_node: CPU only: ranks sharing this machine; each gets one thread when > 1
            (what torchrun sets) and 1/ranks_per_node of the memory.
        cache_dir: folder of the CPU measurement cache; None = ~/.cache/moefold.
    """
    if name.lower() != "cpu":
        return gpu_device(name, dtype)
    return cpu_device(dtype, ranks_per_node=ranks_per_node, cache_dir=cache_dir)


# ---- the measured CPU device ----------------------------------------------------------------


def cpu_device(
    dtype: torch.dtype = torch.float32, *, ranks_per_node: int = 1, cache_dir: str | None = None
) -> Device:
    """This machine's CPU as a planner device: one rank per process, `ranks_per_node` of them."""
    threads = 1 if ranks_per_node > 1 else (os.cpu_count() or 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = device_peak_flops(torch.device("cpu"), dtype, cache_dir)
        measured = _cached_cpu_measurements(threads, cache_dir)
    finally:
        torch.set_num_threads(previous)
    return Device(
        name="cpu",
        peak_flops=peak.flops_per_s,
        memory_bytes=measured["memory_total"] / ranks_per_node,
        memory_bandwidth=measured["memory_bandwidth"],
        intra_node_bandwidth=measured["gloo_bandwidth"],
        inter_node_bandwidth=measured["gloo_bandwidth"],  # one machine: no second network
        intra_node_latency=measured["gloo_latency"],
        inter_node_latency=measured["gloo_latency"],
        gpus_per_node=max(ranks_per_node, 1),
        gemm_efficiency=1.0,  # the peak is itself a measured GEMM rate
        gemm_half_dim=measured["gemm_half_dim"],
        op_overhead=measured["op_overhead"],
        runtime_memory_bytes=measured["runtime_memory"],
        overlap=False,  # gloo collectives block; moefold reduces gradients after backward
        source=f"{peak.source}; {measured['source']}",
    )


def _cached_cpu_measurements(threads: int, cache_dir: str | None) -> dict:
    folder = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "moefold"
    path = folder / "plan_cpu.json"
    key = f"{cpu_model_name()}|threads={threads}|torch={torch.__version__}"
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    if isinstance(entries.get(key), dict):
        return {**entries[key], "source": f"cache: {path} [{key}]"}
    measured = measure_cpu(threads)
    entries[key] = measured
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return {**measured, "source": f"measured: {key}"}


def measure_cpu(threads: int) -> dict:
    """Measure the CPU figures the planner needs (a few seconds); see docs/planner.md."""
    gemm_half_dim = _measure_gemm_half_dim(threads)
    return {
        "memory_total": _memory_total(),
        "memory_bandwidth": _measure_memory_bandwidth(),
        "gemm_half_dim": gemm_half_dim,
        "op_overhead": _measure_op_overhead(),
        **_measure_gloo_and_runtime(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _memory_total() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _best_time(fn, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def _measure_memory_bandwidth() -> float:
    source = torch.empty(32 * MIB // 4)
    target = torch.empty_like(source)
    seconds = _best_time(lambda: target.copy_(source), repeats=10)
    return 2 * source.numel() * 4 / seconds  # read + write


def _measure_gemm_half_dim(threads: int) -> float:
    """G in eff(n) = (n / (n + G))^3 for an n^3 matmul, fitted at n = 128 against n = 1024."""
    torch.set_num_threads(threads)

    def rate(n: int) -> float:
        a, b = torch.randn(n, n), torch.randn(n, n)
        return 2 * n**3 / _best_time(lambda: torch.mm(a, b), repeats=30 if n < 512 else 5)

    ratio = min(rate(128) / rate(1024), 1.0)
    share = ratio ** (1 / 3)  # per-dimension factor at n = 128
    return max(128 * (1 - share) / share, 1.0)


def _measure_op_overhead() -> float:
    """Seconds per small eager op with autograd recording (forward + its backward share)."""
    x = torch.ones(64, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(50):
            y = y * 1.0001
        y.sum().backward()

    return _best_time(chain, repeats=20) / 100  # 50 forward + 50 backward ops


_GLOO_PROBE = r"""
import json, os, resource, sys, tempfile, time
import torch, torch.distributed as dist
import moefold.train.launch  # the modules a training process holds
torch.set_num_threads(1)
rank, path = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", store=dist.FileStore(path, 2), rank=rank, world_size=2)
def best(fn, n):
    fn(); t = float("inf")
    for _ in range(n):
        dist.barrier(); tic = time.perf_counter(); fn(); t = min(t, time.perf_counter() - tic)
    return t
runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
small = torch.ones(8)
latency = best(lambda: dist.all_reduce(small), 50)
big = torch.ones(8 * 2**20 // 4)
out = torch.empty_like(big)
seconds = best(lambda: dist.all_to_all_single(out, big), 5)
if rank == 0:
    print(json.dumps({"gloo_latency": latency, "gloo_bandwidth": big.numel() * 4 / 2 / seconds,
                      "runtime_memory": runtime}))
dist.destroy_process_group()
"""


def _measure_gloo_and_runtime() -> dict:
    """Two fresh local gloo ranks: all-reduce latency, all-to-all bandwidth (bytes sent to the
    peer per second) and the peak RSS of a process that imported moefold's training stack and
    joined a process group (the runtime baseline a training rank starts from)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _GLOO_PROBE, str(rank), store],
                stdout=subprocess.PIPE, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for rank in range(2)
        ]
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError("gloo measurement failed; run `moefold plan --gpu cpu` again")
    return json.loads(outputs[0].strip().splitlines()[-1])


def current_peak_rss() -> float:
    """Peak RSS of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def describe(device: Device) -> dict:
    """The device as a JSON-ready dict."""
    return asdict(device)
