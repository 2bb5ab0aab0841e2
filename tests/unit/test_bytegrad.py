"""ByteGrad's 8-bit min/max quantiser (moefold/parallel/bytegrad.py): the half-step error bound,
codes in range, exact constant chunks, the packed header, and the reference compressed sum."""

import pytest
import torch

from moefold.parallel.bytegrad import (
    HEADER_BYTES,
    dequantize,
    pack,
    packed_bytes,
    quantize,
    reference_sum,
    unpack,
)


def _bound(x_NC: torch.Tensor) -> torch.Tensor:
    """Half a quantisation step per row, plus float32 rounding of values of that size."""
    spread = x_NC.amax(dim=1) - x_NC.amin(dim=1)
    rounding = 4 * torch.finfo(torch.float32).eps * x_NC.abs().amax(dim=1)
    return (spread / 510 + rounding + 1e-30)[:, None]


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_quantize_error_is_at_most_half_a_step(scale):
    torch.manual_seed(0)
    x = torch.randn(16, 1000) * scale + torch.randn(16, 1) * scale
    codes, lo, hi = quantize(x)
    error = (dequantize(codes, lo, hi) - x).abs()
    assert (error <= _bound(x)).all()
    # the bound is tight: rounding to 256 levels does use most of half a step
    assert (error / _bound(x)).amax() > 0.9


def test_codes_cover_0_to_255_and_hit_min_and_max_exactly():
    x = torch.linspace(-3.0, 5.0, 1001)[None]
    codes, lo, hi = quantize(x)
    assert codes.dtype == torch.uint8
    assert codes.min() == 0 and codes.max() == 255
    assert (lo, hi) == (torch.tensor([-3.0]), torch.tensor([5.0]))
    values = dequantize(codes, lo, hi)[0]
    assert values[0] == -3.0
    torch.testing.assert_close(values[-1], torch.tensor(5.0))


@pytest.mark.parametrize("value", [0.0, -2.5, 3e-20, 7e5])
def test_constant_chunk_survives_exactly(value):
    x = torch.full((3, 64), value)
    codes, lo, hi = quantize(x)
    assert (codes == 0).all()
    assert torch.equal(dequantize(codes, lo, hi), x)
    assert torch.equal(unpack(pack(x)), x)


def test_pack_carries_min_max_header_with_each_row():
    torch.manual_seed(1)
    x = torch.randn(4, 10) * torch.tensor([[1.0], [10.0], [100.0], [1e-3]])
    packed = pack(x)
    assert packed.dtype == torch.uint8 and packed.shape == (4, HEADER_BYTES + 10)
    header = packed[:, :HEADER_BYTES].contiguous().view(torch.float32)
    assert torch.equal(header[:, 0], x.amin(dim=1)) and torch.equal(header[:, 1], x.amax(dim=1))
    # rows are independent: unpacking one row alone gives the same values
    assert torch.equal(unpack(packed[2:3])[0], unpack(packed)[2])
    assert (unpack(packed) - x).abs().le(_bound(x)).all()
    assert packed_bytes(10 * 4, 4) == packed.numel()


def test_non_finite_values_stay_non_finite():
    x = torch.tensor([[1.0, float("inf"), 2.0], [0.5, float("nan"), 1.0], [1.0, 2.0, 3.0]])
    out = unpack(pack(x))
    assert not out[0].isfinite().all() and not out[1].isfinite().all()
    assert out[2].isfinite().all()


@pytest.mark.parametrize("n,numel", [(2, 1000), (4, 1001), (3, 7)])
def test_reference_sum_is_within_two_quantisation_steps(n, numel):
    torch.manual_seed(n)
    xs = [torch.randn(numel) for _ in range(n)]
    exact = torch.stack(xs).sum(dim=0)
    out = reference_sum(xs)
    assert out.shape == (numel,)
    # phase 1: each peer's copy of a chunk is off by half of its step; phase 2: the sum's
    chunk = -(-numel // n)
    pad = n * chunk - numel
    rows = [torch.nn.functional.pad(x, (0, pad)).view(n, chunk) for x in xs]
    summed = torch.nn.functional.pad(exact, (0, pad)).view(n, chunk)
    peers = sum(_bound(r) for r in rows)
    # (the sum's range is that of the computed sum, within the phase-1 error of this one)
    bound = (peers + 2 * _bound(summed)).expand(n, chunk).reshape(-1)[:numel]
    assert ((out - exact).abs() <= bound).all()
    # the form: the mean is within two quantisation steps of the exact mean
    step = max((x.max() - x.min()).item() for x in xs) / 255
    assert ((out / n - exact / n).abs() <= 2 * step).all()
    # ranks holding the same gradient get it back up to the final re-quantisation only
    same = reference_sum([xs[0]] * n)
    assert (same - n * xs[0]).abs().max() <= (n * xs[0]).abs().max() * 2 / 255
