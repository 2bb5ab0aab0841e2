"""CAMERA-P micro-expert pruning: the decomposition the score rests on, the score as removal
energy, free pruning of zero units, the sequential layer rule, packing, and zeros that stay
zero under training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moefold.config import ModelConfig, MoEConfig
from moefold.model.init import init_parameters
from moefold.model.moe import MoELayer
from moefold.model.transformer import Transformer
from moefold.prune import command, scoring
from moefold.prune.apply import KeepMask, PruneSpec, prune_in_place, select, zero_units
from moefold.prune.pack import live_widths, pack, stored_width
from moefold.prune.scoring import (
    ActivationEnergy,
    accumulate_energy,
    camera_scores,
    micro_expert_contributions,
)

E, FR, FS, D = 4, 8, 8, 16


def moe_cfg(**overrides) -> MoEConfig:
    values = dict(
        num_experts=E,
        topk=2,
        ffn_hidden=FR,
        shared_ffn_hidden=FS,
        shared_gate=True,
        norm_topk_prob=False,
        grouped_gemm="off",
    )
    return MoEConfig(**{**values, **overrides})


def tiny_layer(seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, moe_cfg()).double().eval()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.5)
    return layer


def tiny_model(layers: int = 2, ffn: int = 48, shared: int = 32, std: float = 0.02) -> Transformer:
    cfg = ModelConfig(
        hidden=32, layers=layers, heads=4, kv_heads=2, ffn_hidden=64, vocab_size=64, init_std=std
    )
    moe = moe_cfg(ffn_hidden=ffn, shared_ffn_hidden=shared)
    model = Transformer(cfg, moe)
    init_parameters(model, cfg, seed=0)
    return model.double().eval()


def tokens(n: int = 4, s: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, s), generator=torch.Generator().manual_seed(seed))


def layer_out(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x_TD[None])[0]


def energy_of(layer: MoELayer, x_TD: torch.Tensor) -> ActivationEnergy:
    energy = ActivationEnergy.zeros(layer)
    accumulate_energy(layer, x_TD.view(2, -1, D), energy)  # two sequences
    return energy


def x_tokens(t: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_decomposition_identity():
    layer, x = tiny_layer(), x_tokens()
    phi_TEF, phi_TS = micro_expert_contributions(layer, x)
    assert (phi_TEF != 0).any(-1).sum(-1).max() == 2  # top-2: two experts per token
    y = torch.einsum("tef,efd->td", phi_TEF, layer.experts.down_proj)
    y = y + phi_TS @ layer.shared_expert.down_proj.weight.T
    torch.testing.assert_close(y, layer_out(layer, x), rtol=0, atol=1e-12)


def _remove(layer: MoELayer, e: int | None, j: int) -> MoELayer:
    ablated = copy.deepcopy(layer)
    keep = KeepMask(torch.ones(E, FR, dtype=torch.bool), torch.ones(FS, dtype=torch.bool))
    (keep.shared if e is None else keep.routed[e])[j] = False
    zero_units(ablated, keep)
    return ablated


def test_score_with_rho0_is_the_energy_removal_takes_from_the_outputs():
    layer, x = tiny_layer(), x_tokens()
    scores = camera_scores(layer, energy_of(layer, x), rho=0.0)
    y = layer_out(layer, x)
    units = [(e, j) for e in range(E) for j in range(FR)] + [(None, j) for j in range(FS)]
    for e, j in units:
        removed = ((y - layer_out(_remove(layer, e, j), x)) ** 2).sum()
        score = scores.shared[j] if e is None else scores.routed[e, j]
        torch.testing.assert_close(score, removed, rtol=1e-9, atol=1e-12)
    assert scores.routed.min() > 0  # every expert got tokens, so no accidental zero


def test_max_term_is_the_largest_single_token_energy():
    layer, x = tiny_layer(), x_tokens()
    phi_TEF, phi_TS = micro_expert_contributions(layer, x)
    scores = camera_scores(layer, energy_of(layer, x), rho=1.0)
    down = layer.experts.down_proj.square().sum(-1)
    torch.testing.assert_close(scores.routed, down * phi_TEF.square().amax(0))
    shared_down = layer.shared_expert.down_proj.weight.square().sum(0)
    torch.testing.assert_close(scores.shared, shared_down * phi_TS.square().amax(0))


def test_planted_zero_units_prune_for_free():
    model, calib = tiny_model(), tokens()
    planted = {"routed": [(0, 3), (2, 0), (3, 47)], "shared": [5, 31]}
    with torch.no_grad():
        for block in model.layers.values():
            for e, j in planted["routed"]:
                block.mlp.experts.down_proj[e, j] = 0
            for j in planted["shared"]:
                block.mlp.shared_expert.down_proj.weight[:, j] = 0
        before = model(calib)
    total = E * 48 + 32
    masks = prune_in_place(model, PruneSpec(ratio=5 / total), calib)
    for mask in masks.values():
        assert sorted(map(tuple, (~mask.routed).nonzero().tolist())) == planted["routed"]
        assert (~mask.shared).nonzero().flatten().tolist() == planted["shared"]
    with torch.no_grad():
        torch.testing.assert_close(model(calib), before, rtol=0, atol=1e-12)


def _mlp_input(model: Transformer, name: str, calib: torch.Tensor) -> torch.Tensor:
    captured = []
    hook = model.layers[name].mlp.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        model(calib)
    hook.remove()
    return captured[0]


def _camera_mask(layer: MoELayer, x_BSD: torch.Tensor, spec: PruneSpec) -> KeepMask:
    energy = ActivationEnergy.zeros(layer)
    accumulate_energy(layer, x_BSD, energy)
    return select(camera_scores(layer, energy, spec.rho), spec.ratio)


def test_each_layer_is_scored_on_the_already_pruned_model():
    """The block-by-block walk equals a naive reference: prune layer 0, then capture layer 1's
    MLP input from a full forward of the partly pruned model, and so on."""
    spec, calib = PruneSpec(ratio=0.4, rho=0.5), tokens()
    walked = tiny_model(layers=3, std=0.3)
    masks = prune_in_place(walked, spec, calib)
    naive = tiny_model(layers=3, std=0.3)
    for name, block in naive.layers.items():
        mask = _camera_mask(block.mlp, _mlp_input(naive, name, calib), spec)
        assert torch.equal(mask.routed, masks[name].routed), name
        assert torch.equal(mask.shared, masks[name].shared), name
        zero_units(block.mlp, mask)
    # Scoring layer 2 on the unpruned model's inputs ranks differently: the rule matters here.
    fresh = tiny_model(layers=3, std=0.3)
    unpruned = _camera_mask(fresh.layers["2"].mlp, _mlp_input(fresh, "2", calib), spec)
    assert not torch.equal(unpruned.routed, masks["2"].routed)


def test_ratio_counts_units_per_layer_over_routed_and_shared():
    model = tiny_model()
    masks = prune_in_place(model, PruneSpec(ratio=0.6), tokens())
    total = E * 48 + 32
    for name, mask in masks.items():
        kept = int(mask.routed.sum() + mask.shared.sum())
        assert kept == total - int(0.6 * total)
        widths = live_widths(model)[name]
        assert widths["routed"] == mask.routed.sum(1).tolist()
        assert widths["shared"] == int(mask.shared.sum())
        assert len(set(widths["routed"])) > 1  # unequal widths


@pytest.mark.parametrize("method", ["camera", "magnitude", "random"])
def test_pack_keeps_the_function_and_shrinks_to_the_widest_expert(method):
    model, calib = tiny_model(), tokens()
    prune_in_place(model, PruneSpec(ratio=0.6, method=method, seed=3), calib)
    packed = pack(model)
    widths = live_widths(model)
    widest = max(max(w["routed"]) for w in widths.values())
    assert packed.moe_cfg.ffn_hidden == stored_width(widest, 48)
    assert packed.moe_cfg.ffn_hidden % 16 == 0 or packed.moe_cfg.ffn_hidden == 48
    assert live_widths(packed) == widths
    for block in packed.layers.values():  # live units first, zeros after
        experts = block.mlp.experts
        live = experts.gate_proj.ne(0).any(1)  # [E, F]
        assert torch.equal(live, live.sort(dim=1, descending=True, stable=True).values)
        assert experts.down_proj.ne(0).any(2).le(live).all()
    with torch.no_grad():
        torch.testing.assert_close(packed(calib), model(calib), rtol=1e-10, atol=1e-10)


def test_stored_width_rounds_up_and_caps():
    assert stored_width(17, 256) == 32
    assert stored_width(0, 256) == 16
    assert stored_width(250, 256) == 256
    assert stored_width(40, 40) == 40


def test_camera_beats_random_pruning_on_the_layer_output():
    """Sanity check (not a paper number): at 30% the energy ranking loses less of the layer
    output than the mean of 20 random rankings."""
    layer, x = tiny_layer(seed=5), x_tokens(t=256)
    y = layer_out(layer, x)

    def error(mask: KeepMask) -> float:
        pruned = copy.deepcopy(layer)
        zero_units(pruned, mask)
        return float(((layer_out(pruned, x) - y) ** 2).mean())

    camera = error(select(camera_scores(layer, energy_of(layer, x), 0.0), 0.3))
    random = [
        error(select(scoring.random_scores(layer, torch.Generator().manual_seed(s)), 0.3))
        for s in range(20)
    ]
    assert camera < 0.5 * sum(random) / len(random)


def _unit_params(model) -> dict[str, torch.Tensor]:
    """Expert and shared-expert matrices (not the router, not the shared expert's gate)."""
    return {
        name: param
        for name, param in model.named_parameters()
        if ("experts." in name or "shared_expert." in name) and not name.endswith(".gate.weight")
    }


def test_pruned_units_stay_exactly_zero_under_adamw():
    model = tiny_model().float()
    prune_in_place(model, PruneSpec(ratio=0.5), tokens())
    model = pack(model).train()
    zeros = {name: param == 0 for name, param in _unit_params(model).items()}
    assert all(zero.any() for zero in zeros.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        batch = tokens(s=17, seed=10 + step)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        for name, param in _unit_params(model).items():
            assert (param.grad[zeros[name]] == 0).all(), name
            assert param.grad.ne(0).any(), name  # the live units do train
        optimizer.step()
        optimizer.zero_grad()
    for name, param in _unit_params(model).items():
        assert (param[zeros[name]] == 0).all(), name


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="--ratio"):
        PruneSpec(ratio=1.0)
    with pytest.raises(ValueError, match="--method"):
        PruneSpec(ratio=0.2, method="norm")
    with pytest.raises(ValueError, match="--rho"):
        PruneSpec(ratio=0.2, rho=2.0)


def test_cli_method_list_matches_the_scorers():
    assert command.METHODS == scoring.METHODS
