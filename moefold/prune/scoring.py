"""Micro-expert scores of one MoE layer (CAMERA, weight magnitude, random).

Shape legend: T tokens, D model dim, E routed experts, F routed expert width, Fs shared expert
width, n rows routed to one expert.

A micro-expert is hidden unit j of one expert: column j of its gate and up projections (moefold
stores them [D, F]; HF's row j) with row j of its down projection (HF's column j). With the
routing fixed, the layer output is linear in the units' activations:

    y(x_t) = sum_(e,j) phi_ej(x_t) w_down[e, j, :] + sum_j phi_sj(x_t) w_shared_down[:, j]
    phi_ej(x_t) = p_te silu(x_t . w_gate[e, :, j]) (x_t . w_up[e, :, j])   (0 if e not chosen)
    phi_sj(x_t) = g(x_t) silu(x_t . w_sgate[j]) (x_t . w_sup[j])      (g = 1 or sigmoid gate)

phi includes the routing probability p_te (after the router's renormalisation and scaling
factor: exactly the weight the layer applies) and the shared expert's sigmoid gate, so that
with rho = 0 the CAMERA score ||w_down_j||^2 * sum_t phi_j(x_t)^2 is exactly the energy
sum_t ||y_t - y_t without j||^2 that removing the unit takes from the layer outputs (the
removal changes neither routing nor the other units). Tokens an expert drops under a capacity
factor do not reach it and count as phi = 0, as in the layer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moefold.model.moe import MoELayer

METHODS = ("camera", "magnitude", "random")


@dataclass
class LayerScores:
    """One score per micro-expert: routed [E, F], shared [Fs] (None without a shared expert)."""

    routed: torch.Tensor
    shared: torch.Tensor | None

    def flat(self) -> torch.Tensor:
        parts = [self.routed.reshape(-1)]
        if self.shared is not None:
            parts.append(self.shared)
        return torch.cat(parts)


@dataclass
class ActivationEnergy:
    """sum_t phi^2 and max_t phi^2 per micro-expert, accumulated over calibration chunks."""

    routed_sum: torch.Tensor
    routed_max: torch.Tensor
    shared_sum: torch.Tensor | None
    shared_max: torch.Tensor | None

    @classmethod
    def zeros(cls, layer: MoELayer) -> ActivationEnergy:
        E, _, Fr = layer.experts.gate_proj.shape
        shared = None
        if layer.shared_expert is not None:
            shared = torch.zeros(layer.shared_expert.gate_proj.weight.shape[0], dtype=torch.float64)
        routed = torch.zeros(E, Fr, dtype=torch.float64)
        return cls(routed, routed.clone(), shared, None if shared is None else shared.clone())

    def add(self, e: int | None, phi_nF: torch.Tensor) -> None:
        """Fold in the activations of rows of routed expert e (None: the shared expert)."""
        if phi_nF.shape[0] == 0:
            return
        squared = phi_nF.double().square()
        if e is None:
            self.shared_sum += squared.sum(0)
            self.shared_max = torch.maximum(self.shared_max, squared.amax(0))
        else:
            self.routed_sum[e] += squared.sum(0)
            self.routed_max[e] = torch.maximum(self.routed_max[e], squared.amax(0))


def _swiglu_units(x_nD: torch.Tensor, gate_DF: torch.Tensor, up_DF: torch.Tensor) -> torch.Tensor:
    return F.silu(x_nD @ gate_DF) * (x_nD @ up_DF)


def shared_activations(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """phi of the shared expert's units [T, Fs], its sigmoid gate included."""
    shared = layer.shared_expert
    phi = _swiglu_units(x_TD, shared.gate_proj.weight.T, shared.up_proj.weight.T)
    if shared.gate is not None:
        phi = phi * torch.sigmoid(shared.gate(x_TD))
    return phi


def routed_rows(layer: MoELayer, x_TD: torch.Tensor, num_sequences: int):
    """(rows [R, D], probs [R], counts per expert [E], routing) exactly as the layer routes
    them: its own router and dispatcher (drops under a capacity factor included)."""
    probs_TK, expert_ids_TK = layer.router(x_TD, num_sequences=num_sequences)
    rows_RD, probs_R, counts_E, _ = layer.dispatcher.dispatch(x_TD, probs_TK, expert_ids_TK)
    return rows_RD, probs_R, counts_E, (probs_TK, expert_ids_TK)


@torch.no_grad()
def accumulate_energy(layer: MoELayer, x_BSD: torch.Tensor, energy: ActivationEnergy) -> None:
    """Add one calibration chunk (the layer's input, [B, S, D]) to `energy`."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    rows_RD, probs_R, counts_E, _ = routed_rows(layer, x_TD, B)
    experts = layer.experts
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        rows = slice(start, start + count)
        phi = _swiglu_units(rows_RD[rows], experts.gate_proj[e], experts.up_proj[e])
        energy.add(e, phi * probs_R[rows, None].to(phi.dtype))
        start += count
    if layer.shared_expert is not None:
        energy.add(None, shared_activations(layer, x_TD))


def _down_norms2(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    routed = layer.experts.down_proj.detach().double().square().sum(-1)  # [E, F]
    shared = None
    if layer.shared_expert is not None:
        shared = layer.shared_expert.down_proj.weight.detach().double().square().sum(0)  # [Fs]
    return routed, shared


def camera_scores(layer: MoELayer, energy: ActivationEnergy, rho: float) -> LayerScores:
    """S = ||w_down_j||^2 * ((1 - rho) * sum_t phi_j^2 + rho * max_t phi_j^2)."""
    routed_down, shared_down = _down_norms2(layer)
    routed = routed_down * ((1 - rho) * energy.routed_sum + rho * energy.routed_max)
    shared = None
    if shared_down is not None:
        shared = shared_down * ((1 - rho) * energy.shared_sum + rho * energy.shared_max)
    return LayerScores(routed, shared)


def magnitude_scores(layer: MoELayer) -> LayerScores:
    """Data-free baseline: ||gate_j|| * ||up_j|| * ||down_j||, the product of the L2 norms of a
    unit's three weight vectors (it bounds how large the unit's output can get for a unit-norm
    input, ignoring how often the expert is routed to)."""
    experts = layer.experts
    routed = (
        experts.gate_proj.detach().double().norm(dim=1)
        * experts.up_proj.detach().double().norm(dim=1)
        * experts.down_proj.detach().double().norm(dim=2)
    )
    shared = None
    if layer.shared_expert is not None:
        s = layer.shared_expert
        shared = (
            s.gate_proj.weight.detach().double().norm(dim=1)
            * s.up_proj.weight.detach().double().norm(dim=1)
            * s.down_proj.weight.detach().double().norm(dim=0)
        )
    return LayerScores(routed, shared)


def random_scores(layer: MoELayer, generator: torch.Generator) -> LayerScores:
    """Uniform random ranking (the chance baseline)."""
    E, _, Fr = layer.experts.gate_proj.shape
    routed = torch.rand(E, Fr, generator=generator, dtype=torch.float64)
    shared = None
    if layer.shared_expert is not None:
        width = layer.shared_expert.gate_proj.weight.shape[0]
        shared = torch.rand(width, generator=generator, dtype=torch.float64)
    return LayerScores(routed, shared)


@torch.no_grad()
def micro_expert_contributions(
    layer: MoELayer, x_TD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference for tests (dense, small layers only): phi of every unit for every token,
    routed [T, E, F] (zero where a token does not reach the expert) and shared [T, Fs]."""
    rows_RD, probs_R, counts_E, routing = routed_rows(layer, x_TD, 1)
    # The same dispatch applied to the token index tells which token each row came from.
    token_T1 = torch.arange(x_TD.shape[0], dtype=x_TD.dtype).unsqueeze(-1)
    token_R = layer.dispatcher.dispatch(token_T1, *routing)[0][:, 0].long()
    E, _, Fr = layer.experts.gate_proj.shape
    phi_TEF = torch.zeros(x_TD.shape[0], E, Fr, dtype=x_TD.dtype)
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        rows = slice(start, start + count)
        act = _swiglu_units(rows_RD[rows], layer.experts.gate_proj[e], layer.experts.up_proj[e])
        phi_TEF[token_R[rows], e] += act * probs_R[rows, None]
        start += count
    shared = shared_activations(layer, x_TD) if layer.shared_expert is not None else None
    return phi_TEF, shared
