"""keep_freed_host_memory: large blocks come from the reusable heap, not from fresh mmaps."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Prints the number of mmapped blocks (mallinfo2().hblks) while a 64 MiB tensor is alive.
PROBE = """
import ctypes, sys
import torch
from moefold.train.host_memory import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_host_memory() is True
before = libc.mallinfo2().hblks
block = torch.empty(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
print(libc.mallinfo2().hblks - before)
"""


def _mmapped_blocks_for_one_large_tensor(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip())


def test_large_blocks_are_mmapped_by_default_and_heap_blocks_when_kept():
    assert _mmapped_blocks_for_one_large_tensor("default") == 1
    assert _mmapped_blocks_for_one_large_tensor("keep") == 0
