"""Shared pieces of the equivalence tests: the tiny model and the per-rank body."""

from __future__ import annotations

import functools

import torch

from moefold.config import load_job
from moefold.parallel.layout import ParallelLayout
from moefold.parallel.mesh import build_parallel_groups
from moefold.testing.reference import (
    GRAD_ATOL,
    GRAD_RTOL,
    LOSS_RTOL,
    run_steps,
    single_process_reference,
)

# 8 heads / 4 kv heads allow tp up to 4; 8 experts allow ep up to 8; ffn widths allow etp 4.
TINY = (
    "model.hidden=32",
    "model.layers=2",
    "model.heads=8",
    "model.kv_heads=4",
    "model.ffn_hidden=64",
    "model.vocab_size=128",
    "moe.num_experts=8",
    "moe.topk=2",
    "moe.ffn_hidden=16",
    "moe.z_loss_coeff=0.001",
    "train.seq_len=16",
    "train.global_batch=16",
    "train.micro_batch=2",
    "train.warmup_steps=1",
    "train.lr=0.01",
    "train.eval_batches=8",
    "data.source=synthetic",
)
STEPS = 5


def job_for(model_overrides: tuple[str, ...], parallel: dict[str, object]):
    extra = [f"parallel.{k}={v}" for k, v in parallel.items() if k != "dispatcher"]
    if "dispatcher" in parallel:
        extra.append(f"moe.dispatcher={parallel['dispatcher']}")
    return load_job("tiny-moe", [*TINY, *model_overrides, *extra])


@functools.cache
def reference(model_overrides: tuple[str, ...]) -> dict:
    return single_process_reference(job_for(model_overrides, {}), STEPS)


def layout_body(rank: int, world_size: int, model_overrides, parallel: dict) -> dict | None:
    job = job_for(tuple(model_overrides), parallel)
    groups = build_parallel_groups(ParallelLayout.from_config(job.parallel, world_size))
    result = run_steps(job, groups, STEPS)
    return result if rank == 0 else None


def assert_matches(
    result: dict,
    ref: dict,
    check_grads: bool = True,
    loss_rtol: float = LOSS_RTOL,
    grad_norm_rtol: float = GRAD_RTOL,
) -> None:
    """Losses and grad norms (and, with check_grads, step-1 gradients) equal the reference's
    within the fp32 tolerances, or the looser ones a caller passes (bf16)."""
    torch.testing.assert_close(
        torch.tensor(result["losses"], dtype=torch.float64),
        torch.tensor(ref["losses"], dtype=torch.float64),
        rtol=loss_rtol,
        atol=0,
    )
    # The global grad norm (and so clipping) sees every shard exactly once.
    torch.testing.assert_close(
        torch.tensor(result["grad_norms"], dtype=torch.float64),
        torch.tensor(ref["grad_norms"], dtype=torch.float64),
        rtol=grad_norm_rtol,
        atol=0,
    )
    if check_grads:
        assert result["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(
                result["grads"][name],
                grad,
                rtol=GRAD_RTOL,
                atol=GRAD_ATOL,
                msg=lambda m, n=name: f"{n}: {m}",
            )
