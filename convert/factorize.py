"""Linear algebra of the latent: activation statistics, bias absorption, joint low-rank PCA.

Everything is second order in the layer input x, so one D x D second moment per layer is all the
calibration data the factorization needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SecondMoment:
    """Running E[x x^T] and E[x] of a layer input, in float64."""

    def __init__(self, dim: int):
        self.xx = torch.zeros(dim, dim, dtype=torch.float64)
        self.x = torch.zeros(dim, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        self.xx += flat.T @ flat
        self.x += flat.sum(0)
        self.count += flat.shape[0]

    @property
    def sigma(self) -> torch.Tensor:
        return self.xx / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.x / max(self.count, 1)


def absorb_bias(weight: torch.Tensor, bias: torch.Tensor | None, sigma: torch.Tensor,
                mean: torch.Tensor) -> torch.Tensor:
    """The linear map closest to x -> W x + b on the calibration inputs (least squares).

    Output formats without biases can still carry the part of a bias that the inputs explain:
    W' = W + b mean^T sigma^-1 minimizes E||W' x - W x - b||^2."""
    if bias is None:
        return weight.double()
    ridge = 1e-6 * sigma.diagonal().mean() * torch.eye(sigma.shape[0], dtype=sigma.dtype)
    coef = torch.linalg.solve(sigma + ridge, mean)
    return weight.double() + bias.double()[:, None] * coef[None, :]


@dataclass
class Latent:
    """Rank-r factorization [K; V] ~ [k_up; v_up] @ down, with its errors on the calibration data."""

    down: torch.Tensor
    k_up: torch.Tensor
    v_up: torch.Tensor
    k_error: float
    v_error: float
    error: float
    optimum: float


def _rel_error(full: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor) -> float:
    diff = full - approx
    den = torch.einsum("ij,jk,ik->", full, sigma, full).item()
    return max(0.0, torch.einsum("ij,jk,ik->", diff, sigma, diff).item() / max(den, 1e-300)) ** 0.5


def joint_latent(k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, rank: int, *,
                 activation_aware: bool = True, balance: bool = True) -> Latent:
    """Top-`rank` principal directions of the stacked no-rope keys and values.

    With `activation_aware`, the directions are those of the outputs' covariance Y sigma Y^T, the
    Eckart-Young optimum of E||Y x - Y' x||^2; otherwise those of the weights alone (plain SVD).
    `balance` scales K to V's mean output norm first so that neither dominates the budget."""
    k, v, sigma = k.double(), v.double(), sigma.double()
    k_energy = torch.einsum("ij,jk,ik->", k, sigma, k).item()
    v_energy = torch.einsum("ij,jk,ik->", v, sigma, v).item()
    scale = (v_energy / k_energy) ** 0.5 if balance and k_energy > 0 and v_energy > 0 else 1.0
    stacked = torch.cat([k * scale, v])
    metric = stacked @ sigma @ stacked.T
    basis_src = metric if activation_aware else stacked @ stacked.T
    _, vecs = torch.linalg.eigh(basis_src)
    basis = vecs[:, -rank:].flip(-1)
    down = basis.T @ stacked
    approx = basis @ down
    evals = torch.linalg.eigvalsh(metric)
    optimum = max(0.0, (evals[:-rank].clamp_min(0).sum() / evals.clamp_min(0).sum().clamp_min(1e-300)).item()) ** 0.5
    n_k = k.shape[0]
    return Latent(
        down=down,
        k_up=basis[:n_k] / scale,
        v_up=basis[n_k:],
        k_error=_rel_error(k, approx[:n_k] / scale, sigma),
        v_error=_rel_error(v, approx[n_k:], sigma),
        error=_rel_error(stacked, approx, sigma),
        optimum=optimum,
    )
