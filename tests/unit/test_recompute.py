"""train.recompute: every mode gives the none mode's losses, gradients and step statistics (the
recomputed forward leaves no trace), and keeps fewer activations for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moefold.config import load_job
from moefold.model import build_model
from moefold.model.recompute import RECOMPUTE_MODES

SMALL = (
    "model.hidden=32",
    "model.layers=2",
    "model.heads=4",
    "model.kv_heads=2",
    "model.ffn_hidden=48",
    "model.vocab_size=64",
    "moe.num_experts=4",
    "moe.topk=2",
    "moe.ffn_hidden=24",
    "moe.z_loss_coeff=0.001",
)
VARIANTS = {
    "aux": (),
    # the running prefix over micro-batches must be the original forward's in the recompute
    "global_aux": ("moe.aux_loss=global_aux",),
    "capacity-drops": ("moe.capacity_factor=0.5",),
    "shared-expert-seq_aux": ("moe.shared_ffn_hidden=16", "moe.aux_loss=seq_aux"),
    "dense-first-bf16": ("moe.first_dense_layers=1", "train.dtype=bf16"),
}
NUM_MICROBATCHES = 3


@pytest.fixture(autouse=True)
def _one_thread():
    # A width-32 model gains nothing from threads; on a busy 2-core machine a second OpenMP
    # thread waiting for a core made each test ~200x slower (6 s instead of 30 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_microbatches(mode: str, overrides: tuple[str, ...]) -> dict:
    """Forward/backward of 3 micro-batches (gradient accumulation) as the trainer does it."""
    job = load_job("tiny-moe", [*SMALL, *overrides])
    model = build_model(job)
    model.set_recompute(mode)
    model.train()
    for layer in model.moe_layers():
        layer.router.aux_grad_scale = 1.0 / NUM_MICROBATCHES
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, job.model.vocab_size, (NUM_MICROBATCHES, 2, 17), generator=generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=job.train.dtype == "bf16")
    losses = []
    for batch in tokens:
        with autocast:
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        (loss / NUM_MICROBATCHES).backward()
        losses.append(loss.detach())
    layers = model.moe_layers()
    return {
        "losses": torch.stack(losses),
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "router_state": [layer.router.step_state() for layer in layers],
        "dropped": [float(layer.stats.dropped) for layer in layers],
        "routed": [layer.stats.routed for layer in layers],
    }


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", [m for m in RECOMPUTE_MODES if m != "none"])
def test_recompute_matches_none_exactly(mode, variant):
    reference = run_microbatches("none", VARIANTS[variant])
    result = run_microbatches(mode, VARIANTS[variant])
    # The same operations on the same values: bit-identical, not just close.
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=0, atol=0)
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=0, msg=name)
    # Step statistics count each micro-batch once (no double counting by the recomputation).
    for got, want in zip(result["router_state"], reference["router_state"], strict=True):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(want[key]))
    assert result["routed"] == reference["routed"]
    assert result["dropped"] == reference["dropped"]


def saved_activation_bytes(mode: str, *overrides: str) -> int:
    """Bytes autograd keeps for backward after one forward (parameters not counted)."""
    job = load_job("tiny-moe", [*SMALL, *overrides])
    model = build_model(job)
    model.set_recompute(mode)
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.data_ptr() not in params:
            total += tensor.numel() * tensor.element_size()
        return tensor

    tokens = torch.randint(0, job.model.vocab_size, (4, 32), generator=torch.Generator())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens).sum().backward()
    return total


def test_each_mode_keeps_fewer_activations_than_the_one_before():
    loop = "moe.grouped_gemm=off"
    saved = [saved_activation_bytes(mode, loop) for mode in ("none", "moe_act", "moe", "full")]
    # The CPU expert loop (kernels/expert_loop.py) keeps only the pre-activations in any mode,
    # so moe_act has nothing left to save there ...
    assert saved[0] == saved[1] > saved[2] > saved[3], saved
    # ... while under autograd (the grouped_mm path) it drops silu(gate) and the product.
    grouped = [saved_activation_bytes(mode, "moe.grouped_gemm=on") for mode in ("none", "moe_act")]
    assert grouped[0] > grouped[1], grouped
    assert saved[0] < grouped[0], (saved, grouped)


def test_no_grad_forward_under_recompute_equals_the_plain_forward():
    job = load_job("tiny-moe", list(SMALL))
    model = build_model(job)
    model.set_recompute("full")
    tokens = torch.randint(0, job.model.vocab_size, (2, 8), generator=torch.Generator())
    with torch.no_grad():
        recomputing = model(tokens)
    model.set_recompute("none")
    with torch.no_grad():
        torch.testing.assert_close(recomputing, model(tokens), rtol=0, atol=0)
