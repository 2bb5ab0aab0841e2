"""Device and network specs the planner's cost model runs on: datasheet GPUs and a measured CPU.

A `Device` is one accelerator (or CPU rank) plus the links it sees: NVLink (or shared memory) to
the other devices of its node and a network port to other nodes, and the rates the cost model
needs. GPU figures are datasheet numbers (the peak comes from moefold/train/peak.py, the table
MFU divides by) times achievable fractions fitted once on the MoE Parallel Folding paper
(docs/planner.md, "Calibration"). The CPU device is measured once on this machine (matmul peak
through `device_peak_flops`, gloo collectives between two local ranks, elementwise and attention
rates, the per-op cost of moefold's eager code, the memory of a bare training process) and
cached in ~/.cache/moefold/plan_cpu.json, like the matmul peak itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moefold.train.peak import cpu_model_name, device_peak_flops, gpu_peak_flops

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device (GPU or CPU rank) and its links; rates per device and per direction."""

    name: str
    peak_flops: float  # dense matmul peak, FLOP/s, in the training dtype (the MFU denominator)
    memory_bytes: float  # memory one device (rank) may use
    memory_bandwidth: float  # bytes/s of memory-bound elementwise kernels (HBM on GPUs)
    intra_node_bandwidth: float  # NVLink (or shared memory) bytes/s to devices of the same node
    inter_node_bandwidth: float  # network bytes/s to other nodes (one port per GPU)
    intra_node_latency: float  # seconds per collective step inside a node
    inter_node_latency: float  # seconds per collective step across nodes
    gpus_per_node: int  # default --nodes-of
    gemm_efficiency: float  # achievable fraction of peak for large GEMMs
    gemm_half_dim: float  # a GEMM dimension this size halves that dimension's efficiency factor
    attention_efficiency: float  # fused causal attention rate as a fraction of peak
    elementwise_passes: float  # memory passes of elementwise kernels per saved activation byte
    collective_efficiency: float  # achieved / link bandwidth, ring all-gather / reduce-scatter
    all_to_all_efficiency: float  # achieved / link bandwidth, token all-to-all of a dispatcher
    op_overhead: float  # seconds of fixed cost per kernel launch / eager op
    runtime_memory_bytes: float  # per-rank memory outside the model: CUDA context, NCCL, runtime
    allocator_overhead: float  # memory the allocator holds beyond live short-lived tensors
    overlap: bool  # the runtime overlaps communication with compute (Megatron-class GPU stacks)
    grouped_gemm: bool  # routed experts run as one grouped GEMM (else a loop over experts)
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

# Achievable fractions, fitted once on the two H100 calibration cases of the MoE Parallel
# Folding paper and used for every GPU (docs/planner.md, "Constants" and "Calibration").
GPU_GEMM_EFFICIENCY = 0.90
GPU_GEMM_HALF_DIM = 384.0
GPU_ATTENTION_EFFICIENCY = 0.45  # 0.5 of the large-GEMM rate (fused attention kernels)
GPU_ELEMENTWISE_PASSES = 2.0  # fused kernels: written once forward, read once backward
CPU_ELEMENTWISE_PASSES = 6.0  # moefold's eager ops, counted on tiny-moe (docs/planner.md)
GPU_COLLECTIVE_EFFICIENCY = 0.70
GPU_ALL_TO_ALL_EFFICIENCY = 0.25  # includes the dispatcher's count exchange and host sync
GPU_OP_OVERHEAD = 4e-6
GPU_RUNTIME_MEMORY = 6 * GIB  # CUDA context, NCCL and cuBLAS workspaces
GPU_ALLOCATOR_OVERHEAD = 0.10  # caching-allocator fragmentation of activations and buffers
# glibc's dynamic mmap threshold keeps freed activation blocks in the heap: a CPU rank's peak
# RSS exceeds its live activations by about half (tiny-moe, docs/planner.md)
CPU_ALLOCATOR_OVERHEAD = 0.50
NVLINK_LATENCY = 3e-6  # per ring step
NETWORK_LATENCY = 6e-6


def device_names() -> list[str]:
    """Names accepted by `get_device` (the --gpu choices)."""
    return [*_GPUS, "cpu"]


def gpu_device(name: str, dtype: torch.dtype = torch.bfloat16) -> Device:
    """The datasheet spec of a GPU; `dtype` picks the peak (bf16/fp16, or fp32 as TF32)."""
    key = name.lower()
    if key not in _GPUS:
        choices = ", ".join(device_names())
        raise ValueError(f"--gpu: unknown device '{name}'; choose one of {choices}")
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
        attention_efficiency=GPU_ATTENTION_EFFICIENCY,
        elementwise_passes=GPU_ELEMENTWISE_PASSES,
        collective_efficiency=GPU_COLLECTIVE_EFFICIENCY,
        all_to_all_efficiency=GPU_ALL_TO_ALL_EFFICIENCY,
        op_overhead=GPU_OP_OVERHEAD,
        runtime_memory_bytes=GPU_RUNTIME_MEMORY,
        allocator_overhead=GPU_ALLOCATOR_OVERHEAD,
        overlap=True,
        grouped_gemm=True,
        source=peak.source,
    )


def get_device(
    name: str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    ranks_per_node: int = 1,
    cache_dir: str | None = None,
) -> Device:
    """A GPU from the datasheet table, or this machine's CPU (measured once, then cached).

    Args:
        name: one of device_names().
        dtype: training dtype; sets the peak (on CPU also the matmul benchmark's dtype).
        ranks_per_node: CPU only: ranks sharing this machine; each runs one thread when > 1
            (what torchrun sets), and they share the cores and the memory.
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
    cores = os.cpu_count() or 1
    threads = 1 if ranks_per_node > 1 else cores
    share = min(1.0, cores / ranks_per_node)  # more ranks than cores: they take turns
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = device_peak_flops(torch.device("cpu"), dtype, cache_dir)
        m = _cached_cpu_measurements(threads, cache_dir)
    finally:
        torch.set_num_threads(previous)
    return Device(
        name="cpu",
        peak_flops=peak.flops_per_s * share,
        memory_bytes=m["memory_total"] / ranks_per_node,
        memory_bandwidth=m["elementwise_bandwidth"] * share,
        intra_node_bandwidth=m["gloo_bandwidth"],
        inter_node_bandwidth=m["gloo_bandwidth"],  # one machine: no network was measured
        intra_node_latency=m["gloo_latency"],
        inter_node_latency=m["gloo_latency"],
        gpus_per_node=max(ranks_per_node, 1),
        gemm_efficiency=1.0,  # the peak is itself a measured GEMM rate
        gemm_half_dim=m["gemm_half_dim"],
        attention_efficiency=m["attention_flops"] / peak.flops_per_s,
        elementwise_passes=CPU_ELEMENTWISE_PASSES,
        collective_efficiency=1.0,  # the bandwidth is a measured all-reduce rate
        all_to_all_efficiency=m["gloo_all_to_all_bandwidth"] / m["gloo_bandwidth"],
        op_overhead=m["op_overhead"] / share,
        runtime_memory_bytes=m["runtime_memory"],
        allocator_overhead=CPU_ALLOCATOR_OVERHEAD,
        overlap=False,  # gloo collectives block; moefold reduces gradients after the backward
        grouped_gemm=False,  # moefold loops over local experts on CPU (model/experts.py)
        source=f"{peak.source}; {m['source']}",
    )


def _cached_cpu_measurements(threads: int, cache_dir: str | None) -> dict:
    folder = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "moefold"
    path = folder / "plan_cpu.json"
    key = f"{cpu_model_name()}|threads={threads}|torch={torch.__version__}|v5"
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or corrupt: measure again and overwrite
        entries = {}
    if isinstance(entries.get(key), dict):
        return {**entries[key], "source": f"cache: {path} [{key}]"}
    measured = measure_cpu(threads)
    entries[key] = measured
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plan_cpu.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:  # atomic: concurrent readers see old or new, not half
        json.dump(entries, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return {**measured, "source": f"measured: {key}"}


def measure_cpu(threads: int) -> dict:
    """Measure the CPU figures the planner needs (about ten seconds; docs/planner.md)."""
    return {
        "memory_total": _memory_total(),
        "elementwise_bandwidth": _measure_elementwise(),
        "gemm_half_dim": _measure_gemm_half_dim(),
        "attention_flops": _measure_attention(),
        "op_overhead": _measure_op_overhead(),
        **_measure_gloo_and_runtime(),
        "threads": threads,
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


def _best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up: what the machine can do."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def _measure_elementwise() -> float:
    """Bytes/s (read + write) of the elementwise kernels a step runs: a SiLU, a product, an
    exponential and a log-softmax over 16 MiB, each into a fresh output."""
    x = torch.randn(4 * MIB)
    ops = [
        lambda: torch.nn.functional.silu(x),
        lambda: x * 1.0001,
        lambda: torch.exp(x),
        lambda: torch.log_softmax(x.view(-1, 4096), -1),
    ]
    seconds = sum(_best_time(op, 10) for op in ops)
    return len(ops) * 2 * x.numel() * 4 / seconds


def _measure_gemm_half_dim() -> float:
    """G of the GEMM shape rule, from a training-like triple at a small shape (forward, and the
    two backward GEMMs with their transposed operands) against a 2048^3 matmul."""
    m, n, k = 512, 256, 128
    x, w, dy = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    triple = _best_time(lambda: (x @ w, dy @ w.t(), x.t() @ dy), 30)
    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / _best_time(lambda: a @ a, 3)
    efficiency = min(3 * 2 * m * n * k / triple / peak, 1.0)
    low, high = 0.0, 4096.0  # eff(G) = prod(d / (d + G)) falls with G: bisect
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (
            (mid, high)
            if m * n * k / ((m + mid) * (n + mid) * (k + mid)) > efficiency
            else (low, mid)
        )
    return max(low, 1.0)


def _measure_attention() -> float:
    """FLOP/s (size.py's causal count, forward + backward) of scaled_dot_product_attention at
    4 sequences of 256 tokens, 4 query / 2 key-value heads of 64."""
    q = torch.randn(4, 4, 256, 64, requires_grad=True)
    k = torch.randn(4, 2, 256, 64, requires_grad=True)
    v = torch.randn(4, 2, 256, 64, requires_grad=True)

    def step() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True
        )
        out.sum().backward()

    flops = 3 * (4 * 256) * 2 * 256 * 4 * 64
    return flops / _best_time(step, 10)


def _measure_op_overhead() -> float:
    """Seconds per aten op of a moefold forward + backward at negligible sizes (module calls,
    autograd and dispatch included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moefold.config import load_job
    from moefold.model import build_model

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    sizes = [
        "model.hidden=16",
        "model.ffn_hidden=16",
        "moe.ffn_hidden=16",
        "model.heads=2",
        "model.kv_heads=1",
        "model.vocab_size=64",
    ]
    model = build_model(load_job("tiny-moe", sizes))
    tokens = torch.randint(0, 64, (1, 8))

    def step() -> None:
        model(tokens).float().mean().backward()

    with _Count() as counter:
        step()
    return _best_time(step, 20) / counter.ops


_GLOO_PROBE = r"""
import json, resource, sys, time
import torch, torch.distributed as dist
import moefold.train.launch  # the modules a training process holds
from moefold.config import load_job
from moefold.model import build_model
torch.set_num_threads(1)
rank, path = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", store=dist.FileStore(path, 2), rank=rank, world_size=2)
sizes = ["model.hidden=16", "model.ffn_hidden=16", "moe.ffn_hidden=16", "model.heads=2",
         "model.kv_heads=1", "model.vocab_size=64"]
model = build_model(load_job("tiny-moe", sizes))  # one step of a negligible model: autograd
optimizer = torch.optim.AdamW(model.parameters(), foreach=True)  # and optimizer state is warm
model(torch.randint(0, 64, (1, 8))).float().mean().backward()
optimizer.step()
runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def best(fn, n):
    fn(); t = float("inf")
    for _ in range(n):
        dist.barrier(); tic = time.perf_counter(); fn(); t = min(t, time.perf_counter() - tic)
    return t
small, work = torch.ones(8), torch.randn(256, 256)
waits = []
for _ in range(200):  # typical, not best: a collective between bits of compute, as in a step
    work @ work
    tic = time.perf_counter(); dist.all_reduce(small); waits.append(time.perf_counter() - tic)
latency = sorted(waits)[len(waits) // 2]
big = torch.ones(8 * 2**20 // 4)
out = torch.empty_like(big)
reduce_s = best(lambda: dist.all_reduce(big), 5)
exchange_s = best(lambda: dist.all_to_all_single(out, big), 5)
if rank == 0:  # bytes each rank sends: all-reduce 2 (n-1)/n of the buffer, all-to-all (n-1)/n
    print(json.dumps({"gloo_latency": latency, "gloo_bandwidth": big.numel() * 4 / reduce_s,
                      "gloo_all_to_all_bandwidth": big.numel() * 4 / 2 / exchange_s,
                      "runtime_memory": runtime}))
dist.destroy_process_group()
"""


def _measure_gloo_and_runtime() -> dict:
    """Two fresh local gloo ranks: the median latency of a small all-reduce issued between bits
    of compute (a rank waits for its peer's scheduling, as in a step), the best all-reduce and
    all-to-all bandwidth (bytes a rank sends per second), and the peak RSS of a rank that
    imported the training stack, joined a process group and ran one step of a negligible model:
    the baseline a training rank starts from.

    The ranks are started by a shell that forks them: Linux carries a process's peak RSS across
    exec, so a rank forked straight from this (large) process would report ours."""
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "probe.py")
        Path(script).write_text(_GLOO_PROBE)
        store = os.path.join(folder, "store")
        procs = [
            subprocess.Popen(
                ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, script, str(rank), store],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for rank in range(2)
        ]
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise RuntimeError("gloo measurement failed; run `moefold plan --gpu cpu` again")
    return json.loads(outputs[0].strip().splitlines()[-1])
