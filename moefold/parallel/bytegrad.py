"""ByteGrad's 8-bit min/max quantiser (BAGUA's "MinMaxUInt8") and the plain reference of the
compressed sum that moefold/parallel/compressed_reduce.py runs across ranks.

Each chunk (a row of an [N, C] tensor) is quantised with its own minimum and maximum:
    scale = 255 / (max - min),  code = round((x - min) * scale) in [0, 255],
    x' = code / scale + min,
so |x' - x| <= (max - min) / 510 per element (half a step), up to float32 rounding. A packed
chunk is a uint8 row: an 8-byte header holding min and max as two float32, then the C codes,
so the two floats travel with their chunk through one collective.

A constant chunk (max == min) gets codes 0 and comes back exactly. Non-finite values make the
header non-finite, and the whole chunk then dequantises to non-finite values, so the trainer's
non-finite check still sees them.

Shape legend: N chunks (one per rank), C elements per chunk.

Written by hand: torch's quantize_per_tensor uses one scale per tensor and its per-channel
variant takes the scales as input, while ByteGrad needs each row's own min and max carried
inside the same byte buffer as its codes.
"""

from __future__ import annotations

import torch

LEVELS = 255  # codes 0..255
HEADER_BYTES = 8  # float32 min and max in front of each chunk's codes
# Ranges below this are treated as this: keeps 255 / range finite (range is never 0 on purpose).
MIN_RANGE = 1e-30


def _scale(lo_N: torch.Tensor, hi_N: torch.Tensor) -> torch.Tensor:
    return LEVELS / (hi_N - lo_N).clamp(min=MIN_RANGE)


def quantize(x_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row min/max quantisation: returns (codes [N, C] uint8, min [N], max [N]) in float32."""
    x_NC = x_NC.float()
    lo_N, hi_N = x_NC.amin(dim=1), x_NC.amax(dim=1)  # aminmax(dim=) measured 4x slower on CPU
    # (x - min) first: x * scale - min * scale would cancel catastrophically when |min| is
    # much larger than the range. The levels lie in [0, 255] up to rounding, so adding 0.5
    # and truncating in the uint8 cast rounds to nearest without a clamp pass. Non-finite
    # levels cast to arbitrary codes; the header then makes the row non-finite anyway.
    levels = torch.sub(x_NC, lo_N[:, None]).mul_(_scale(lo_N, hi_N)[:, None]).add_(0.5)
    return levels.to(torch.uint8), lo_N, hi_N


def dequantize(codes_NC: torch.Tensor, lo_N: torch.Tensor, hi_N: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] values of the codes."""
    step_N = 1.0 / _scale(lo_N, hi_N)
    return torch.addcmul(lo_N[:, None], codes_NC.float(), step_N[:, None])


def pack(x_NC: torch.Tensor) -> torch.Tensor:
    """Quantise each row and pack it with its header: uint8 [N, HEADER_BYTES + C]."""
    codes, lo_N, hi_N = quantize(x_NC)
    header = torch.stack([lo_N, hi_N], dim=1).contiguous().view(torch.uint8)  # [N, 8]
    return torch.cat([header, codes], dim=1)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] values of packed rows [N, HEADER_BYTES + C]."""
    # a fresh [N, 8] buffer: a byte slice may sit at an offset no float32 view can start at
    header = torch.empty(packed.size(0), HEADER_BYTES, dtype=torch.uint8)
    header = header.copy_(packed[:, :HEADER_BYTES]).view(torch.float32)  # [N, 2]
    return dequantize(packed[:, HEADER_BYTES:], header[:, 0], header[:, 1])


def packed_bytes(numel: int, group_size: int) -> int:
    """Bytes of one rank's packed copy of `numel` elements split into `group_size` chunks."""
    return group_size * (HEADER_BYTES + -(-numel // group_size))


def reference_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    """What every rank gets from the compressed sum of the 1-D tensors `xs` (one per rank):
    rank j owns chunk j; it sums its own chunk exactly and the other ranks' quantised copies
    (in rank order), re-quantises the sum, and every rank dequantises all owners' sums."""
    n, numel = len(xs), xs[0].numel()
    chunk = -(-numel // n)
    rows = [torch.nn.functional.pad(x.float(), (0, n * chunk - numel)).view(n, chunk) for x in xs]
    sums = []
    for owner in range(n):
        parts = [
            rows[r][owner] if r == owner else unpack(pack(rows[r][owner][None]))[0]
            for r in range(n)
        ]
        sums.append(torch.stack(parts).sum(dim=0))
    return unpack(pack(torch.stack(sums))).reshape(-1)[:numel].to(xs[0].dtype)
