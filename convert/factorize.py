"""Linear algebra of the latent: activation statistics, bias absorption, joint low-rank PCA.

Everything is second order in the layer input x, so one D x D second moment per layer is all the
calibration data the factorization needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class SecondMoment:
    """Running E[x x^T] and E[x] of a layer input, in float64, on the device of the passes that
    measure it: the factorization reads them there (`device`)."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.xx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.x = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add a chunk: its products in the input's own precision (float32 BLAS is several times
        faster than float64), summed across chunks in float64."""
        flat = x.reshape(-1, x.shape[-1])
        self.xx += (flat.T @ flat).double()
        self.x += flat.sum(0).double()
        self.count += flat.shape[0]

    @property
    def device(self) -> torch.device:
        return self.xx.device

    @property
    def sigma(self) -> torch.Tensor:
        return self.xx / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.x / max(self.count, 1)

    def shrunk(self, amount: float) -> torch.Tensor:
        """sigma pulled towards its diagonal by `amount` (0: as measured, 1: the diagonal alone).

        The calibration tokens fix the directions the latent keeps; correlations between input
        channels that only this text has would make it keep directions other text does not use.
        The diagonal keeps each channel's energy and drops those correlations."""
        sigma = self.sigma
        if amount == 0:
            return sigma
        return (1 - amount) * sigma + amount * torch.diag(sigma.diagonal())


def absorb_bias(weight: torch.Tensor, bias: torch.Tensor | None, sigma: torch.Tensor,
                mean: torch.Tensor) -> torch.Tensor:
    """The linear map closest to x -> W x + b on the calibration inputs (least squares).

    Output formats without biases can still carry the part of a bias that the inputs explain:
    W' = W + b mean^T sigma^-1 minimizes E||W' x - W x - b||^2."""
    if bias is None:
        return weight.double()
    return weight.double() + bias.double()[:, None] * _constant_fit(sigma, mean)[None, :]


# The least mean-square residual of a bias absorbed on unseen text, as a share of the bias: the
# calibration tokens' own residual underestimates it (on Qwen2.5-Coder's first layer 0.0002 on the
# calibration text, 0.015 on Python code), so it is taken at least this large.
ABSORB_RESIDUAL_FLOOR = 1e-2


def absorb_residual(sigma: torch.Tensor, mean: torch.Tensor) -> float:
    """Mean square of the per-token residual 1 - c^T x that `absorb_bias` leaves (its error is the
    bias times it): 1 - mean^T sigma^-1 mean on the calibration inputs, at least ABSORB_RESIDUAL_FLOOR."""
    return max(ABSORB_RESIDUAL_FLOOR, 1 - (mean.double() @ _constant_fit(sigma, mean)).item())


def _constant_fit(sigma: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The c of least E(c^T x - 1)^2: sigma^-1 mean, with a ridge of 1e-6 of the mean input energy."""
    ridge = 1e-6 * sigma.diagonal().mean() * torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    return torch.linalg.solve(sigma.double() + ridge.double(), mean.double())


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


def _sqrt_and_inverse(metric: torch.Tensor | None, n: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD error metric and its inverse (identity on `device` when None)."""
    if metric is None:
        eye = torch.eye(n, dtype=torch.float64, device=device)
        return eye, eye
    vals, vecs = torch.linalg.eigh(metric.double())
    vals = vals.clamp_min(0) + 1e-6 * vals.clamp_min(0).mean().clamp_min(1e-300)
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


def joint_latent(k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, rank: int, *,
                 activation_aware: bool = True, balance: bool = True, k_metric: torch.Tensor | None = None,
                 v_metric: torch.Tensor | None = None, key_weight: float = 1.0) -> Latent:
    """Top-`rank` principal directions of the stacked no-rope keys and values.

    With `activation_aware`, the directions are those of the outputs' covariance Y sigma Y^T, the
    Eckart-Young optimum of E||Y x - Y' x||^2; otherwise those of the weights alone (plain SVD).
    `k_metric` and `v_metric` weight the errors by what they cost downstream (E[q q^T] for keys,
    W_o^T W_o for values), so the optimum is taken in that metric. `balance` then scales K to V's
    output energy so that neither dominates the budget, and `key_weight` weights the keys' share
    against the values' from there. Runs on the inputs' device."""
    k, v, sigma = k.double(), v.double(), sigma.double()
    wk, wk_inv = _sqrt_and_inverse(k_metric, k.shape[0], k.device)
    wv, wv_inv = _sqrt_and_inverse(v_metric, v.shape[0], v.device)
    kw, vw = wk @ k, wv @ v
    k_energy = torch.einsum("ij,jk,ik->", kw, sigma, kw).item()
    v_energy = torch.einsum("ij,jk,ik->", vw, sigma, vw).item()
    scale = (v_energy / k_energy) ** 0.5 if balance and k_energy > 0 and v_energy > 0 else 1.0
    scale *= key_weight ** 0.5
    stacked = torch.cat([kw * scale, vw])
    metric = stacked @ sigma @ stacked.T
    basis_src = metric if activation_aware else stacked @ stacked.T
    _, vecs = torch.linalg.eigh(basis_src)
    basis = vecs[:, -rank:].flip(-1)
    down = basis.T @ stacked
    evals = torch.linalg.eigvalsh(metric)
    optimum = max(0.0, (evals[:-rank].clamp_min(0).sum() / evals.clamp_min(0).sum().clamp_min(1e-300)).item()) ** 0.5
    n_k = k.shape[0]
    k_up, v_up = wk_inv @ basis[:n_k] / scale, wv_inv @ basis[n_k:]
    return Latent(
        down=down,
        k_up=k_up,
        v_up=v_up,
        k_error=_rel_error(k, k_up @ down, sigma),
        v_error=_rel_error(v, v_up @ down, sigma),
        error=_rel_error(stacked, basis @ down, sigma),
        optimum=optimum,
    )


class LeastSquares:
    """Running normal equations of y ~ W a over calibration tokens, for the closed-form refit of a
    linear map (o_proj) once everything before it is fixed.

    At 70B shapes each matrix here is 8192 x 8192 in float64 (512 MiB), so the cross moment is kept
    in W's own layout (n_out, n_in) and nothing below builds a second matrix of that size that it
    can avoid (no identity, no transposed copies)."""

    def __init__(self, n_in: int, n_out: int, device: str | torch.device = "cpu"):
        self.aa = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.ya = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
        self.yy = 0.0
        self.count = 0

    def update(self, a: torch.Tensor, y: torch.Tensor) -> None:
        """Add a chunk, with products in the inputs' precision summed in float64 (as SecondMoment)."""
        a, y = a.reshape(-1, a.shape[-1]), y.reshape(-1, y.shape[-1])
        self.aa += (a.T @ a).double()
        self.ya += (y.T @ a).double()
        self.yy += y.double().pow(2).sum().item()
        self.count += a.shape[0]

    def solve(self, prior: torch.Tensor, ridge: float) -> torch.Tensor:
        """The W (n_out, n_in) of least squared error, shrunk towards `prior` (the map before the refit)
        by `ridge` times the mean energy per input.

        Head outputs are far from isotropic (attention-sink heads are nearly constant), so the plain
        normal equations are ill-conditioned: their solution fits calibration noise along weakly
        excited directions and blows up on other text. The ridge keeps those directions at the
        prior and barely moves the others; how much is chosen on held-out tokens."""
        lam = ridge * self.aa.diagonal().mean().clamp_min(1e-300).item()
        gram = self.aa.clone()
        gram.diagonal().add_(lam)
        rhs = torch.add(self.ya, prior.double(), alpha=lam)
        return torch.linalg.solve(gram, rhs.T).T

    def error(self, w: torch.Tensor) -> float:
        """Summed squared error of W on the accumulated tokens, from the normal equations alone."""
        w = w.double()
        cross = torch.dot(w.reshape(-1), self.ya.reshape(-1)).item()
        return max(0.0, self.yy - 2 * cross + (w @ self.aa).mul_(w).sum().item())

    def relative_error(self, w: torch.Tensor) -> float:
        """||y - W a|| / ||y|| over the accumulated tokens: the attention error mlakit reports."""
        return math.sqrt(self.error(w) / max(self.yy, 1e-300))
