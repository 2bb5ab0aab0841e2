"""Experiment (not in core): the shared expert computed while the dispatch all-to-all is in flight.

    python experiments/overlap_shared_expert.py [--ep 2 4] [--tokens 2048 --hidden 1024
        --ffn 128 --shared-ffn 256] [--steps 20]

One MoE layer (all-to-all dispatcher, dropless, top-2 of 8, with a shared expert), forward +
backward on ep gloo ranks (one thread each). Two forwards, timed round-robin step by step:
- serial: count exchange -> all-to-all rows -> shared expert -> experts -> combine;
- overlap: count exchange -> launch the rows all-to-all (async_op=True) -> shared expert ->
  wait -> experts -> combine. The backward stays synchronous.
Both give the same output as `MoELayer.forward` (checked first). Steps start after a barrier,
in alternating order. Printed: step times (slowest rank's median), tokens/s, and per-phase
medians of rank 0 (the serial all-to-all, the serial shared expert, launch + shared expert
and the wait when overlapped).

Result on this machine (2 cores shared with other jobs, load 8-18), 30 steps, barrier and
alternating order: the forward all-to-all takes 4-21 ms per layer forward of a 500-1100 ms
step; overlapped, "launch + shared" took 73.6 vs 4.2 + 68.9 ms serial (ep2, tokens 1024,
hidden 512, ffn 512, shared 1024), 117.7 vs 6.7 + 111.2 (ep4), 83.6 vs 9.5 + 76.4 (ep2,
defaults) and 117.2 vs 21.1 + 117.4 (ep4, defaults): at most the all-to-all's 1-2 % of the
step is hidden, because gloo's worker thread needs the same two cores. Whole-step ratios came
out 1.024x, 1.206x, 0.997x, 0.958x, i.e. noise (0.87x - 1.25x over five runs). Not kept in
core (docs/decisions.md).

Shape legend: T tokens per rank, D model dim, K experts per token, R rows, n ep size, e local
experts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moefold.config import MoEConfig
from moefold.dispatch.all_to_all import source_to_expert_order
from moefold.dispatch.local import gather_rows, scatter_rows
from moefold.dispatch.routing import route_slots
from moefold.model.moe import MoELayer
from moefold.parallel.comm import all_to_all, exchange_counts
from moefold.parallel.expert_parallel import apply_ep
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.dist import run_ranks


class PendingWork:
    """The work handle of an all-to-all in flight (and its input, kept alive until the wait)."""

    work = None
    source = None


class _AllToAllStart(torch.autograd.Function):
    """Forward: launch the all-to-all, return the buffer it fills. Backward: synchronous mirror."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, pending):
        x = x.contiguous()
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        pending.work = dist.all_to_all_single(
            out, x, output_splits, input_splits, group=group, async_op=True
        )
        pending.source = x
        ctx.args = (output_splits, input_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits, group = ctx.args
        grad = grad.contiguous()
        grad_x = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_x, grad, input_splits, output_splits, group=group)
        return grad_x, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    """Forward: wait for the all-to-all; the buffer is valid from here on. Backward: identity."""

    @staticmethod
    def forward(ctx, out, pending):
        pending.work.wait()
        pending.source = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def moe_forward(layer: MoELayer, x_BSD: torch.Tensor, overlap: bool, phases: dict) -> torch.Tensor:
    """MoELayer.forward with the all-to-all dispatch written out (dropless, etp = 1)."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    probs_TK, ids_TK = layer.router(x_TD, num_sequences=B)
    dispatcher = layer.dispatcher
    group, n, e = dispatcher.ep_group, dispatcher.ep_size, dispatcher.num_local_experts
    routing = route_slots(ids_TK, probs_TK, dispatcher.num_experts, None)
    rows_RD, probs_R, token_index_R = gather_rows(x_TD, probs_TK, routing.slots_R, False)
    received_E = exchange_counts(routing.tokens_per_expert_E, group, family="ep")
    sent = routing.tokens_per_expert_E.view(n, e).sum(1).tolist()
    received = received_E.view(n, e).sum(1).tolist()
    probs_R = all_to_all(probs_R, received, sent, group, family="ep")
    start = time.perf_counter()
    if overlap:
        pending = PendingWork()
        rows_RD = _AllToAllStart.apply(rows_RD, received, sent, group, pending)
        shared_TD = layer.shared_expert(x_TD)
        launched = time.perf_counter()
        rows_RD = _AllToAllWait.apply(rows_RD, pending)
        phases.setdefault("overlap: launch + shared", []).append(launched - start)
        phases.setdefault("overlap: wait", []).append(time.perf_counter() - launched)
    else:
        rows_RD = all_to_all(rows_RD, received, sent, group, family="ep")
        exchanged = time.perf_counter()
        shared_TD = layer.shared_expert(x_TD)
        phases.setdefault("serial: all-to-all", []).append(exchanged - start)
        phases.setdefault("serial: shared", []).append(time.perf_counter() - exchanged)
    counts_ne = received_E.view(n, e)
    sort_index = source_to_expert_order(counts_ne, sum(received))
    out_RD = layer.experts(rows_RD[sort_index], probs_R[sort_index], counts_ne.sum(0))
    inverse = torch.empty_like(sort_index)
    inverse[sort_index] = torch.arange(sort_index.numel())
    back_RD = all_to_all(out_RD[inverse], sent, received, group, family="ep")
    out_TD = scatter_rows(back_RD, token_index_R, x_TD.shape[0]) + shared_TD
    return out_TD.view(B, S, D)


def rank_body(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    torch.use_deterministic_algorithms(False)
    groups = build_parallel_groups(ParallelLayout.build(world_size, ep=world_size))
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, topk=2, ffn_hidden=args.ffn, shared_ffn_hidden=args.shared_ffn)
    layer = MoELayer(args.hidden, cfg)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.02)
    apply_ep(layer, groups)
    generator = torch.Generator().manual_seed(rank)
    shape = (2, args.tokens // 2, args.hidden)
    x_BSD = torch.randn(shape, generator=generator).requires_grad_()
    grad_BSD = torch.randn(shape, generator=generator)

    def step(overlap: bool, phases: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x_BSD.grad = None
        out = moe_forward(layer, x_BSD, overlap, phases)
        out.backward(grad_BSD)
        return out.detach(), x_BSD.grad.clone()

    reference = layer(x_BSD.detach())
    for overlap in (False, True):
        out, _ = step(overlap, {})
        torch.testing.assert_close(out, reference.detach(), rtol=1e-5, atol=1e-6)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    phases: dict[str, list[float]] = {}
    for index in range(args.steps + args.warmup):
        # Alternate which variant goes first, and start every step together, so that neither
        # inherits the other's skew between ranks.
        for overlap in (False, True) if index % 2 else (True, False):
            dist.barrier()
            tic = time.perf_counter()
            step(overlap, phases if index >= args.warmup else {})
            if index >= args.warmup:
                seconds[overlap].append(time.perf_counter() - tic)
    return {
        "serial_s": statistics.median(seconds[False]),
        "overlap_s": statistics.median(seconds[True]),
        "phases_ms": {name: 1e3 * statistics.median(v) for name, v in phases.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=128, help="routed expert FFN hidden")
    parser.add_argument("--shared-ffn", type=int, default=256, help="shared expert FFN hidden")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(
        f"# torch {torch.__version__}, 1 thread per rank; tokens {args.tokens} per rank, "
        f"hidden {args.hidden}, top-2 of 8, ffn {args.ffn}, shared ffn {args.shared_ffn}"
    )
    print("| ep | serial ms | overlap ms | serial tok/s | overlap tok/s | speedup | rank 0 ms |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for ep in args.ep:
        results = run_ranks(rank_body, ep, args, timeout=900)
        serial = max(r["serial_s"] for r in results)
        overlap = max(r["overlap_s"] for r in results)
        tokens = ep * args.tokens
        phases = ", ".join(f"{k} {v:.1f}" for k, v in results[0]["phases_ms"].items())
        print(
            f"| {ep} | {1e3 * serial:.1f} | {1e3 * overlap:.1f} | {tokens / serial:.0f} | "
            f"{tokens / overlap:.0f} | {serial / overlap:.3f} | {phases} |"
        )


if __name__ == "__main__":
    main()
