"""The per-expert SwiGLU loop as one autograd function (the CPU expert path).

Shape legend: R rows grouped by expert, D model dim, F expert FFN hidden, e local experts,
r rows of one expert.

Why a hand-written backward instead of autograd over `unbind` views:
- weight gradients are written straight into one (e, D, F) tensor per matrix. `unbind`'s
  backward first makes e separate gradients and then stacks them: on the paper-size layer
  that copy cost 630 ms of a 7.2 s fp32 step (8.8%, an AVX2 machine, torch.profiler);
- the output rows are written in place, so no `cat` of per-expert outputs either;
- backward keeps only the gate and up pre-activations ([R, F] each) and the unscaled expert
  outputs ([R, D]); autograd would keep silu(gate) and the product as well. The pre-activations
  are kept as their GEMMs produced them (fp32 when bf16 products are upcast): backward then
  differentiates exactly the values forward activated, and skips rounding [R, F] twice to bf16
  and back (paper-size layer, bf16: 0.86 -> 0.92x the dense MLP, for 2x their memory). The
  activation is recomputed from the kept pre-activations (two elementwise passes; silu's
  derivative uses torch's fused `silu_backward`, and the probability scales the [r, D]
  gradient, not [r, F]);
- each weight matrix is cast to the GEMM dtype once for all experts (one [e, D, F] copy, not
  e small ones) and that copy is kept for backward, as autocast keeps a Linear's bf16 weight;
  with weights already in the GEMM dtype nothing is copied. Per-expert casts in forward and
  again in backward cost ~0.9 s of a 6 s profiled cpu-moe-1024 bf16 step (two steps);
- kept tensors are one per expert, not slices of one [R, F] buffer: glibc serves blocks
  under 32 MiB from its heap but maps (and page-faults) every larger one afresh, measured
  ~0.45 ms per MiB here, which cost a 117 MiB buffer ~50 ms per allocation;
- bf16 products can run as fp32 GEMMs on CPUs without bf16 instructions (kernels/gemm.py).
`loop_reference` in experts.py is the plain reference the tests compare this against.

Math per expert (x rows, p probabilities, a = silu(g) * u, g = x Wg, u = x Wu, o = a Wd):
out = p * o;  dp = sum(dout * o);  d = p * dout;  dWd = a^T d;  da = d Wd^T;
du = da * silu(g);  dg = da * u * silu'(g);  dWg = x^T dg;  dWu = x^T du;  dx = dg Wg^T + du Wu^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moefold.kernels.gemm import GemmDtypes, backward_without_autocast


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, straight into `out` when the dtypes allow it (no temporary)."""
    if out.dtype == a.dtype == b.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


class SwiGLUExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, probs_R, gate_eDF, up_eDF, down_eFD, counts, dtypes: GemmDtypes):
        x_m = dtypes.operand(x_RD)
        # Each weight is cast once for all experts and the copy kept for backward, as autocast
        # keeps the bf16 weight of a Linear (no copy at all when the weights are in the GEMM
        # dtype already).
        gate_m, up_m, down_m = (dtypes.operand(w) for w in (gate_eDF, up_eDF, down_eFD))
        out_RD = x_RD.new_empty(x_RD.shape, dtype=dtypes.compute)
        kept = []  # per expert with rows: gate and up pre-activations, unscaled output
        for i, rows in _expert_rows(counts):
            x = x_m[rows]
            gate = x @ gate_m[i]
            up = x @ up_m[i]
            act = dtypes.operand(F.silu(gate) * up)  # the down GEMM's input, in bf16 if bf16
            expert_out = (act @ down_m[i]).to(dtypes.compute)
            torch.mul(expert_out, probs_R[rows, None], out=out_RD[rows])
            kept += [gate, up, expert_out]
        ctx.save_for_backward(x_RD, probs_R, gate_m, up_m, down_m, *kept)
        ctx.counts, ctx.dtypes = counts, dtypes
        ctx.weight_dtype = gate_eDF.dtype
        return out_RD

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad_out_RD):
        x_RD, probs_R, gate_m, up_m, down_m, *kept = ctx.saved_tensors
        dtypes, m = ctx.dtypes, ctx.dtypes.matmul
        need_x, need_p, need_gate, need_up, need_down = ctx.needs_input_grad[:5]
        grad_out_RD = grad_out_RD.contiguous()  # e.g. a zero-stride gradient from .sum()
        x_m = dtypes.operand(x_RD)
        grad_x = torch.empty(x_RD.shape, dtype=m, device=x_RD.device) if need_x else None
        grad_p = torch.empty_like(probs_R) if need_p else None
        grads_w = [
            torch.empty_like(w, dtype=ctx.weight_dtype) if need else None
            for w, need in ((gate_m, need_gate), (up_m, need_up), (down_m, need_down))
        ]
        idle = [i for i, count in enumerate(ctx.counts) if count == 0]
        for grad_w in grads_w:
            for i in idle if grad_w is not None else ():
                grad_w[i].zero_()  # not grad_w[idle] = 0: an index_put, 8x slower
        for (i, rows), (gate, up, expert_out) in zip(
            _expert_rows(ctx.counts), _triples(kept), strict=True
        ):
            x = x_m[rows]
            g, u = gate, up  # in the GEMM dtype already (kept unrounded)
            dout = grad_out_RD[rows].to(m)
            if need_p:
                grad_p[rows] = (dout * expert_out.to(m)).sum(-1, dtype=probs_R.dtype)
            d_out = dout * probs_R[rows, None].to(m)  # [r, D]: cheaper than scaling [r, F]
            silu = F.silu(g)
            if grads_w[2] is not None:
                _mm_into(grads_w[2][i], dtypes.operand(silu * u).T, d_out)
            d_act = d_out @ down_m[i].T
            d_up = d_act * silu
            d_gate = torch.ops.aten.silu_backward(d_act.mul_(u), g)  # fused: d * silu'(g)
            if grads_w[0] is not None:
                _mm_into(grads_w[0][i], x.T, d_gate)
            if grads_w[1] is not None:
                _mm_into(grads_w[1][i], x.T, d_up)
            if need_x:
                torch.mm(d_gate, gate_m[i].T, out=grad_x[rows])
                grad_x[rows].addmm_(d_up, up_m[i].T)
        if need_x:
            grad_x = grad_x.to(x_RD.dtype)
        return grad_x, grad_p, *grads_w, None, None


def _expert_rows(counts: list[int]):
    """(expert, row slice) of every expert that has rows."""
    start = 0
    for i, count in enumerate(counts):
        if count:
            yield i, slice(start, start + count)
        start += count


def _triples(tensors: list[torch.Tensor]):
    return zip(tensors[0::3], tensors[1::3], tensors[2::3], strict=True)


def swiglu_expert_loop(
    x_RD: torch.Tensor,
    probs_R: torch.Tensor,
    gate_eDF: torch.Tensor,
    up_eDF: torch.Tensor,
    down_eFD: torch.Tensor,
    counts: list[int],
    upcast_bf16: bool,
) -> torch.Tensor:
    """Rows grouped by expert (`counts` rows each) -> probability-scaled expert outputs [R, D]
    in the compute dtype (autocast's inside autocast)."""
    dtypes = GemmDtypes.for_input(x_RD, upcast_bf16)
    with torch.autocast(device_type=x_RD.device.type, enabled=False):
        return SwiGLUExpertLoop.apply(x_RD, probs_R, gate_eDF, up_eDF, down_eFD, counts, dtypes)
