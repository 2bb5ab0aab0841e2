"""moefold's router and LocalDispatcher against Megatron-Core 0.16.1's own TopKRouter and
moe_utils (permute / unpermute / capacity), run on CPU through tests/parity/megatron_cpu.py.

Both get the same router input (a [S, B, D] micro-batch for Megatron, the same tokens
batch-major for moefold) and gate weight; with the identity weight the logits are the input,
so input gradients are gradients w.r.t. the logits. Compared per micro-batch: selected
experts, probabilities, kept slots, per-expert counts, capacity, the combined output of
per-expert linear maps, aux / seq_aux / global_aux and z-loss values, and the gradient of
sum(G * combined) + losses w.r.t. the logits (and the gate weight where it is not the identity).
Differences that stay are asserted as documented in docs/config.md ("Routing and Megatron-Core").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from moefold.config import MoEConfig
from moefold.dispatch.local import LocalDispatcher
from moefold.dispatch.routing import expert_capacity
from moefold.model.router import TopKRouter
from tests.parity.megatron_cpu import (
    TRACKER_NAMES,
    TransformerConfig,
    build_router,
    megatron_combine,
    megatron_cpu,
    megatron_kwargs,
    moe_utils,
    tracked_losses,
)

S, B, H = 8, 3, 5  # positions, sequences per micro-batch, hidden size of the toy experts


@dataclass(frozen=True)
class Case:
    moe: dict
    experts: int = 8
    microbatches: int = 1
    gate: str = "identity"  # "identity": logits = input; "random": a [E, 6] gate weight
    jitter_seed: int | None = None
    extra: dict = field(default_factory=dict)


def C(experts=8, microbatches=1, gate="identity", **moe) -> Case:
    return Case(moe, experts, microbatches, gate)


SIG = {"score": "sigmoid", "norm_topk_prob": True}
CASES = {
    # score functions x top-k
    "softmax-k2": C(topk=2),
    "softmax-k4": C(topk=4),
    "softmax-k8-e16": C(16, topk=8),
    "pre-softmax-k1": C(topk=1, pre_softmax=True),
    "pre-softmax-k2": C(topk=2, pre_softmax=True),
    "pre-softmax-k6": C(topk=6, pre_softmax=True),
    "sigmoid-k1": C(topk=1, score="sigmoid"),
    "sigmoid-k2": C(topk=2, **SIG),
    "sigmoid-k8-e16": C(16, topk=8, **SIG),
    "softmax-k3-e16": C(16, topk=3),
    "softmax-k5-e16": C(16, topk=5),
    "softmax-k7-e16": C(16, topk=7),
    # scaling factor
    "pre-softmax-scale2.5": C(topk=2, pre_softmax=True, scaling_factor=2.5),
    "sigmoid-scale2.5": C(topk=2, scaling_factor=2.5, **SIG),
    # group-limited routing
    "softmax-groups": C(16, topk=4, num_groups=4, group_topk=2),
    "pre-softmax-groups": C(16, topk=4, num_groups=4, group_topk=2, pre_softmax=True),
    "sigmoid-groups-k8": C(16, topk=8, num_groups=8, group_topk=4, **SIG),
    # expert bias (sigmoid, as Megatron allows it), alone and with groups
    "sigmoid-bias": C(topk=2, expert_bias=True, aux_loss="none", **SIG),
    "sigmoid-bias-groups": C(
        16, topk=4, expert_bias=True, num_groups=4, group_topk=2, aux_loss="none", **SIG
    ),
    # capacity, drop policy, padding (position policy: see test_position_policy_documented)
    "cf1.0-probs": C(topk=2, capacity_factor=1.0),
    "cf1.25-probs": C(topk=2, capacity_factor=1.25),
    "cf1.0-probs-pad": C(topk=2, capacity_factor=1.0, pad_to_capacity=True),
    "cf1.25-probs-pad-sigmoid": C(topk=2, capacity_factor=1.25, pad_to_capacity=True, **SIG),
    "cf1.0-pre-softmax-k1": C(topk=1, pre_softmax=True, capacity_factor=1.0),
    "cf1.25-position-nodrop": C(topk=2, capacity_factor=4.0, drop_policy="position"),
    # balancing losses (across micro-batches for global_aux) and z-loss
    "aux": C(topk=2, aux_loss="aux", aux_loss_coeff=0.1),
    "seq_aux": C(topk=2, aux_loss="seq_aux", aux_loss_coeff=0.1),
    "seq_aux-sigmoid": C(topk=3, aux_loss="seq_aux", aux_loss_coeff=0.1, **SIG),
    "global_aux-3mb": C(topk=2, microbatches=3, aux_loss="global_aux", aux_loss_coeff=0.1),
    "global_aux-sigmoid-3mb": C(
        topk=2, microbatches=3, aux_loss="global_aux", aux_loss_coeff=0.1, **SIG
    ),
    "aux-groups-bias": C(
        16, topk=4, num_groups=4, group_topk=2, expert_bias=True, aux_loss_coeff=0.1, **SIG
    ),
    "z-loss": C(topk=2, z_loss_coeff=0.01),
    "z-loss-aux-cf1.0": C(topk=2, z_loss_coeff=0.01, capacity_factor=1.0),
    # router dtype and input jitter, through the gate GEMM
    "router-fp32-gate": C(topk=2, gate="random", aux_loss_coeff=0.1),
    "router-fp64-gate": C(topk=2, gate="random", router_dtype="fp64", aux_loss_coeff=0.1),
    "router-fp64-pre-softmax": C(topk=1, gate="random", router_dtype="fp64", pre_softmax=True),
    "jitter": C(topk=2, gate="random", input_jitter=0.05, aux_loss_coeff=0.1),
    "jitter-sigmoid-fp64": C(topk=2, gate="random", input_jitter=0.1, router_dtype="fp64", **SIG),
}


def moe_config(case: Case) -> MoEConfig:
    fields = {"num_experts": case.experts, "ffn_hidden": 4, "aux_loss_coeff": 0.0, **case.moe}
    return MoEConfig(**fields)


def batch_major(x_SB: torch.Tensor) -> torch.Tensor:
    """[S, B, ...] (Megatron's token order) -> [B * S, ...] (moefold's)."""
    return x_SB.transpose(0, 1).reshape(B * S, *x_SB.shape[2:])


def seq_major(x_T: torch.Tensor) -> torch.Tensor:
    """[B * S, ...] (moefold) -> [S * B, ...] (Megatron's flattened [S, B])."""
    return x_T.view(B, S, *x_T.shape[1:]).transpose(0, 1).reshape(S * B, *x_T.shape[1:])


def dense(values_TK: torch.Tensor, ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(ids_TK.shape[0], num_experts, dtype=values_TK.dtype).scatter(
        1, ids_TK, values_TK
    )


@dataclass
class MicroBatch:
    """One micro-batch's results, in Megatron's token order [S * B]."""

    probs_TE: torch.Tensor  # after capacity (dropped slots 0)
    kept_TE: torch.Tensor  # routed slots an expert computes
    counts_E: torch.Tensor  # rows per expert (capacity each when padded)
    out_TD: torch.Tensor
    aux: float
    z: float
    grads: dict[str, torch.Tensor]


def run_megatron(case, cfg, inputs, hiddens, weight, expert_w, grad_out, bias):
    results = []
    with megatron_cpu() as group:
        router = build_router(cfg, weight, group)
        if cfg.expert_bias:
            router.expert_bias.copy_(bias)
        before = {}
        for x_SBD, h_SBH, g_SBH in zip(inputs, hiddens, grad_out):
            x = x_SBD.clone().requires_grad_(True)
            h = h_SBH.reshape(S * B, H).clone().requires_grad_(True)
            if case.jitter_seed is not None:
                torch.manual_seed(case.jitter_seed)
            router.weight.grad = None
            probs, routing_map = router(x)
            capacity = (
                moe_utils.get_capacity(S * B * cfg.topk, cfg.num_experts, cfg.capacity_factor)
                if cfg.pad_to_capacity
                else None
            )
            combined = megatron_combine(h, probs, routing_map, expert_w, capacity)
            (combined.output_TD * g_SBH.reshape(S * B, H)).sum().backward()
            losses = tracked_losses()
            aux_name = TRACKER_NAMES.get(cfg.aux_loss)
            aux = losses.get(aux_name, 0.0) - before.get(aux_name, 0.0)
            z = losses.get("z_loss", 0.0) - before.get("z_loss", 0.0)
            before = losses
            results.append(
                MicroBatch(
                    probs_TE=probs.detach(),
                    kept_TE=routing_map & (probs.detach() > 0),
                    counts_E=combined.tokens_per_expert_E,
                    out_TD=combined.output_TD.detach(),
                    aux=aux * cfg.aux_loss_coeff,
                    z=z * cfg.z_loss_coeff,
                    grads={
                        "logits_or_input": x.grad.reshape(S * B, -1),
                        "hidden": h.grad,
                        "weight": router.weight.grad.clone(),
                    },
                )
            )
        results[-1].grads["expert_bias_counts"] = (
            router.local_tokens_per_expert.clone() if cfg.expert_bias else None
        )
    return results


def run_moefold(case, cfg, inputs, hiddens, weight, expert_w, grad_out, bias):
    router = TopKRouter(weight.shape[1], cfg)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.expert_bias.copy_(bias)
    router.train()
    dispatcher = LocalDispatcher(cfg)
    results = []
    aux_before = z_before = 0.0
    for x_SBD, h_SBH, g_SBH in zip(inputs, hiddens, grad_out):
        x = batch_major(x_SBD).clone().requires_grad_(True)
        h = batch_major(h_SBH).clone().requires_grad_(True)
        if case.jitter_seed is not None:
            torch.manual_seed(case.jitter_seed)
        router.weight.grad = None
        probs_TK, ids_TK = router(x, num_sequences=B)
        rows, probs_R, counts, plan = dispatcher.dispatch(h, probs_TK, ids_TK, num_sequences=B)
        outs = [
            (chunk @ expert_w[e]) * p.unsqueeze(-1)
            for e, chunk, p in zip(
                range(cfg.num_experts), rows.split(counts.tolist()), probs_R.split(counts.tolist())
            )
        ]
        out = dispatcher.combine(torch.cat(outs), plan)
        (out * batch_major(g_SBH)).sum().backward()
        # kept slots from the dispatcher's rows (padding rows point at token T)
        T = B * S
        row_expert = torch.repeat_interleave(torch.arange(cfg.num_experts), counts)
        real = plan.token_index_R < T
        kept = torch.zeros(T, cfg.num_experts, dtype=torch.bool)
        kept[plan.token_index_R[real], row_expert[real]] = True
        probs_TE = dense(probs_TK.detach(), ids_TK, cfg.num_experts) * kept
        aux, z = float(router.step_aux_loss), float(router.step_z_loss)
        results.append(
            MicroBatch(
                probs_TE=seq_major(probs_TE),
                kept_TE=seq_major(kept),
                counts_E=counts,
                out_TD=seq_major(out.detach()),
                aux=aux - aux_before,
                z=z - z_before,
                grads={
                    "logits_or_input": seq_major(x.grad),
                    "hidden": seq_major(h.grad),
                    "weight": router.weight.grad.clone(),
                },
            )
        )
        aux_before, z_before = aux, z
    results[-1].grads["expert_bias_counts"] = (
        router.step_tokens_per_expert.clone() if cfg.expert_bias else None
    )
    return results


def run_case(case: Case, seed: int | None = None):
    cfg = moe_config(case)
    E = cfg.num_experts
    seed = sum(map(ord, repr(case))) % 2**31 if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    D = E if case.gate == "identity" else 6
    weight = torch.eye(E) if case.gate == "identity" else torch.randn(E, D, generator=gen)
    scale = 2.0 if case.gate == "identity" else 1.0
    inputs = [scale * torch.randn(S, B, D, generator=gen) for _ in range(case.microbatches)]
    hiddens = [torch.randn(S, B, H, generator=gen) for _ in range(case.microbatches)]
    grad_out = [torch.randn(S, B, H, generator=gen) for _ in range(case.microbatches)]
    expert_w = torch.randn(E, H, H, generator=gen)
    bias = 0.3 * torch.randn(E, generator=gen)
    args = (cfg, inputs, hiddens, weight, expert_w, grad_out, bias)
    return cfg, run_megatron(case, *args), run_moefold(case, *args)


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
def test_router_matches_megatron(name):
    case = CASES[name]
    if case.moe.get("input_jitter"):
        case = Case(case.moe, case.experts, case.microbatches, case.gate, jitter_seed=7)
    cfg, meg, ours = run_case(case)
    fp64 = cfg.router_dtype == "fp64"
    # Megatron's softmax and sigmoid run in fp32 even under router_dtype=fp64 (documented).
    tol = dict(rtol=2e-6, atol=2e-6) if fp64 else dict(rtol=1e-5, atol=1e-6)
    for m, o in zip(meg, ours):
        assert torch.equal(m.kept_TE, o.kept_TE), "kept slots / selected experts"
        torch.testing.assert_close(o.probs_TE, m.probs_TE.float(), **tol)
        assert m.counts_E.tolist() == o.counts_E.tolist()
        torch.testing.assert_close(o.out_TD, m.out_TD.float(), **tol)
        torch.testing.assert_close(o.aux, m.aux, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(o.z, m.z, rtol=1e-5, atol=1e-7)
        for key in ("logits_or_input", "hidden", "weight"):
            torch.testing.assert_close(o.grads[key], m.grads[key].float(), **tol, msg=key)
    if cfg.aux_loss != "none" and cfg.aux_loss_coeff > 0:
        assert all(o.aux > 0 for o in ours)
    if cfg.capacity_factor is not None and not cfg.pad_to_capacity:
        capacity = expert_capacity(S * B, cfg.num_experts, cfg.topk, cfg.capacity_factor)
        megatron_capacity = moe_utils.get_capacity(
            S * B * cfg.topk, cfg.num_experts, cfg.capacity_factor
        )
        assert capacity == megatron_capacity
        assert max(o.counts_E.max() for o in ours) <= capacity
    if cfg.expert_bias:
        # Both count the experts the router chose (dropless here) for the bias update.
        torch.testing.assert_close(
            ours[-1].grads["expert_bias_counts"], meg[-1].grads["expert_bias_counts"]
        )


def test_capacity_cases_drop_tokens():
    """The capacity cases above bind: some slots are dropped (else they test nothing)."""
    for name in ("cf1.0-probs", "cf1.25-probs", "cf1.0-probs-pad", "cf1.0-pre-softmax-k1"):
        cfg, meg, ours = run_case(CASES[name])
        routed = S * B * cfg.topk
        assert int(ours[0].kept_TE.sum()) < routed, name


@pytest.mark.parametrize("pad", [False, True], ids=["drop", "pad"])
@pytest.mark.parametrize("factor", [1.0, 1.25])
def test_position_policy_documented(factor, pad):
    """Documented difference: Megatron's position policy picks the kept tokens with
    torch.topk over a 0/1 map, whose choice among the tied routed tokens is unspecified (on CPU
    it is not the earliest); moefold keeps the earliest positions, sequence-major ([S, B]
    order, Megatron's stated rule). Same capacity, same number kept per expert."""
    case = C(topk=2, capacity_factor=factor, drop_policy="position", pad_to_capacity=pad)
    cfg, (meg,), (ours,) = run_case(case, seed=5)
    capacity = expert_capacity(S * B, cfg.num_experts, cfg.topk, factor)
    assert meg.counts_E.tolist() == ours.counts_E.tolist()
    assert meg.kept_TE.sum(0).tolist() == ours.kept_TE.sum(0).tolist()
    # The same micro-batch without capacity: every routed slot, in [S, B] order.
    (routed,) = run_case(C(topk=2), seed=5)[2]
    routed_TE = routed.kept_TE
    earliest = routed_TE & (routed_TE.int().cumsum(0) <= capacity)
    assert torch.equal(ours.kept_TE, earliest)
    assert not bool((meg.kept_TE & ~routed_TE).any())  # Megatron keeps routed slots only
    assert int(ours.kept_TE.sum()) < int(routed_TE.sum())  # the capacity binds


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_megatron_refuses_what_moefold_documents_as_its_own():
    """Options moefold keeps that Megatron-Core does not have (docs/config.md)."""
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=1, add_bias_linear=False)
    for moe in (
        dict(topk=2, expert_bias=True),  # expert bias with softmax scores
        dict(topk=1),  # top-1 with softmax after top-k: moefold refuses it too (check_job)
    ):
        cfg = MoEConfig(num_experts=8, ffn_hidden=4, **moe)
        with pytest.raises(ValueError):
            TransformerConfig(**base, **megatron_kwargs(cfg))
    for moe in (dict(pre_softmax=True, norm_topk_prob=True), dict(score="sigmoid")):
        with pytest.raises(ValueError, match="Megatron-Core|no Megatron"):
            megatron_kwargs(MoEConfig(num_experts=8, ffn_hidden=4, topk=2, **moe))


def test_group_score_when_topk_below_group_topk_documented():
    """K < group_topk: Megatron scores every group by the sum of its top 0 (= 0), so groups
    are picked by topk's tie order; moefold scores a group by its best expert, so the best
    expert overall is always reachable."""
    cfg = MoEConfig(
        num_experts=8, ffn_hidden=4, topk=1, pre_softmax=True, num_groups=4, group_topk=2
    )
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    router = TopKRouter(8, cfg)
    ours = router.group_limited_topk(torch.softmax(logits, -1))
    assert torch.equal(ours[:, 0], logits.argmax(-1))
    _, theirs = moe_utils.group_limited_topk(torch.softmax(logits, -1), 1, 64, 8, 4, 2)
    assert not torch.equal(theirs[:, 0], logits.argmax(-1))


def test_input_jitter_only_in_training_documented():
    """Megatron jitters the router input in eval too; moefold only while training."""
    cfg = MoEConfig(num_experts=8, ffn_hidden=4, topk=2, input_jitter=0.1)
    weight = torch.randn(8, 6)
    x = torch.randn(S, B, 6)
    with megatron_cpu() as group:
        megatron = build_router(cfg, weight, group).eval()
        with torch.no_grad():
            first, second = megatron(x)[0], megatron(x)[0]
    assert not torch.equal(first, second)
    ours = TopKRouter(6, cfg).eval()
    with torch.no_grad():
        ours.weight.copy_(weight)
        assert torch.equal(ours(batch_major(x), B)[0], ours(batch_major(x), B)[0])
