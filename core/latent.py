"""The two latent encodings of the output format, and the fits they need.

Exact: `latent_norm_trick` keeps the latent so small that kv_a_layernorm is a fixed per-channel
scale, so a plain (norm-free) MLA block is written without any loss. Native: the latent stays at a
normal scale that quantization keeps and kv_a_layernorm really normalizes; `native_attention`
refits kv_b_proj in closed form to absorb the norm. Both map plain weights to the tensors named by
the format contract (`deepseek.py`) and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import minimize

from mlakit.core.deepseek import LATENT_NORM_EPS, attention_names
from mlakit.core.forward import MLAWeights

# The latent's mean square stays below this fraction of eps, so RMSNorm(c) = c / sqrt(eps) to 5e-7.
LATENT_NORM_MARGIN = 1e-6
# Ridge of the native format's least-squares refit, relative to the mean of the Gram diagonal.
NATIVE_RIDGE = 1e-6
# L-BFGS iterations and eigenvalue spread of the native format's latent metric (`latent_metric`). Whitened,
# and with its scales refitted under the bound, 20 iterations do as well as the 100 that the fit from
# M = I took, in a fifth of the time. Held-out attention error against the exact format per layer, mean
# (worst), with the refit's weight on the first position: bundled demo 0.021 (0.028) vs 0.030 (0.044),
# SmolLM2-135M at half cache 0.071 (0.134) vs 0.069 (0.134); from M = I at 20 iterations, 0.059 (0.087)
# and 0.071 (0.139).
NATIVE_METRIC_STEPS = 20
NATIVE_METRIC_CONDITION = 30.0
# Calibration latents per layer the native format's latent metric is fitted on (a random subset).
NATIVE_METRIC_TOKENS = 16384
# The metric's fit runs in float32: on the bundled demo its held-out attention error matched float64's
# (0.0275 vs 0.0276 mean over layers) at a half to a fifth of the time; its eigenbasis is taken in float64.
NATIVE_METRIC_DTYPE = torch.float32
# Refit weight of each window's first position (the attention sink), per position of its window.
NATIVE_FIRST_WEIGHT = 1.0
# Worst-case mean square of a latent, as a fraction of eps, below which the latent norm is taken as linear.
LINEAR_REGIME = 1e-2


def latent_norm_trick(latent: torch.Tensor, input_gamma: torch.Tensor, hidden: int,
                      eps: float = LATENT_NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale the latent rows so that kv_a_layernorm acts as the constant scale 1/sqrt(eps).

    The layer input is gamma * n with ||n|| <= sqrt(hidden), so ||latent @ x|| is bounded by
    sqrt(hidden) * ||latent diag(gamma)||_2; alpha keeps mean(c^2) <= margin * eps for every input.
    Returns the scaled rows and the norm weight sqrt(eps) / alpha that undoes the scale, a power of two.
    """
    rank = latent.shape[0]
    bound = torch.linalg.matrix_norm(latent.double() * input_gamma.double().to(latent.device), ord=2).item()
    bound *= math.sqrt(hidden)
    largest = math.sqrt(LATENT_NORM_MARGIN * eps * rank) / max(bound, 1e-30)
    # the norm weight is rounded up to a power of two, exact in bf16 (rounding it would scale every key
    # and value of the layer by up to 0.4%); alpha only shrinks, so the bound still holds
    weight = 2.0 ** math.ceil(math.log2(math.sqrt(eps) / largest))
    alpha = math.sqrt(eps) / weight
    return latent * alpha, torch.full((rank,), weight, dtype=latent.dtype, device=latent.device)


def plain_latent(scaled: torch.Tensor, norm_weight: torch.Tensor, eps: float = LATENT_NORM_EPS) -> torch.Tensor:
    """Undo `latent_norm_trick`: the plain latent rows that training works on."""
    return scaled * (norm_weight / math.sqrt(eps)).unsqueeze(1)


class LatentMoments:
    """Calibration statistics of one layer's plain latent c, for `native_attention`'s refit.

    In the native format kv_a_layernorm really normalizes: kv_b_proj sees n = w * RMSNorm(T c),
    with T the latent's transform and w the norm's weight (`native_transform`), instead of c. Since
    every row of kv_b_proj is regressed on the same n, the least-squares
    kv_b' = argmin sum_t ||kv_b' n_t - kv_b c_t||^2 is kv_b C for one rank x rank
    C = (sum c n^T)(sum n n^T)^-1, whatever weight each output row gets; these sums are all it needs.

    The first position of each window (latents given as (..., seq, rank)) weighs as much as its whole
    window (`NATIVE_FIRST_WEIGHT` * seq): every query sees it and trained models make it the attention
    sink, with a latent far shorter than the others that the norm would stretch to their length. On
    SmolLM2-135M at half cache it takes 61-68% of the attention in layers 18, 25 and 26, with a latent
    0.66, 0.18 and 0.25 times the median's length; unweighted, the native format's held-out attention
    error in those layers was 0.27, 0.93 and 0.83 (0.056, 0.067 and 0.10 with the exact format's key and
    value put back at that one position), weighted 0.071, 0.079 and 0.12; the mean over layers went from
    0.14 to 0.071 (weights from seq / 4 to 4 seq alike), layers with no sink losing up to 0.02 (0.082 to
    0.10 in layer 10, which gives the first position 1% of its attention).
    """

    def __init__(self, transform: torch.Tensor, weight: torch.Tensor):
        self.transform, self.weight = transform.double(), weight.double().to(transform.device)
        rank, device = transform.shape[0], transform.device
        self.cn = torch.zeros(rank, rank, dtype=torch.float64, device=device)
        self.nn = torch.zeros(rank, rank, dtype=torch.float64, device=device)

    def update(self, c: torch.Tensor) -> None:
        """Add plain latents c (..., rank), or (..., seq, rank) windows whose first position is weighted."""
        self._add(c.reshape(-1, c.shape[-1]), 1.0)
        if c.dim() >= 3 and c.shape[-2] > 1:
            self._add(c[..., 0, :].reshape(-1, c.shape[-1]), NATIVE_FIRST_WEIGHT * c.shape[-2] - 1.0)

    def _add(self, c: torch.Tensor, weight: float) -> None:
        # products in float32 (a chunk's, as the pipeline passes them), sums across chunks in float64:
        # on SmolLM2-135M the held-out error matched all-float64 sums to 1e-4 at a fifth of the time
        c = c.float()
        t = c @ self.transform.T.float()
        n = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS) * self.weight.float()
        self.cn += weight * (c.T @ n).double()
        self.nn += weight * (n.T @ n).double()

    def refit(self) -> torch.Tensor:
        """C: kv_b C maps normalized latents to what kv_b makes of the plain ones."""
        ridge = NATIVE_RIDGE * self.nn.diagonal().mean().clamp_min(1e-30)
        eye = torch.eye(self.nn.shape[0], dtype=self.nn.dtype, device=self.nn.device)
        return torch.linalg.solve(self.nn + ridge * eye, self.cn.T).T


def normalized_latent(c: torch.Tensor, eps: float = LATENT_NORM_EPS) -> torch.Tensor:
    """kv_a_layernorm without its weight, in float64."""
    c = c.double()
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


def latent_metric(c: torch.Tensor, steps: int = NATIVE_METRIC_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, V): the metric M = V diag(s^2) V^T that makes ||diag(s) V^T c|| as constant as it can
    over calibration latents c, s at most 1.

    The norm's output is a fixed linear map of c exactly when the rms of what it normalizes is
    constant; the plain latent's rms varies by 10-30% over real text, and an ellipsoidal metric
    flattens it (the relative variance of c^T M c, `_metric_root`). Returned in its eigenbasis so that
    each latent row gets one scale s_k of its own (mixing scales inside a row or a kv_b_proj column
    would let quantization noise of the large ones swamp the small ones); s is kept within
    NATIVE_METRIC_CONDITION of its largest value, and fitted again, per row, under that bound
    (`_bounded_scales`): clipping the scales of the free fit instead undoes most of what it gained."""
    c = c.reshape(-1, c.shape[-1]).to(NATIVE_METRIC_DTYPE)
    if steps == 0:
        return (torch.ones(c.shape[1], dtype=torch.float64, device=c.device),
                torch.eye(c.shape[1], dtype=torch.float64, device=c.device))
    c = c / c.pow(2).mean().sqrt().clamp_min(1e-30)
    root = _metric_root(c, steps)
    e, v = torch.linalg.eigh(root.T @ root)
    s = _bounded_scales(c, v, e.clamp_min(0)).sqrt()
    return s / s.max(), v


def _metric_root(c: torch.Tensor, steps: int) -> torch.Tensor:
    """R (float64) with M = R^T R: L-BFGS on the relative variance of q = ||R c||^2 over latents c, in
    coordinates where c is white, from M = Sigma^-1/2, half way from I to Sigma^-1 (the optimum for a
    Gaussian c). c's covariance Sigma spans two orders of magnitude, and the steps of the fit in c's own
    coordinates from M = I are that badly scaled: on the bundled demo, the relative variance that its
    100 iterations reached (0.0011 and 0.0024 in layers 0 and 2), these pass within 30 (within 10 in
    layer 2)."""
    n = c.shape[0]
    lam, basis = torch.linalg.eigh((c.T @ c).double() / n)
    lam = lam.clamp_min(lam.max().item() * 1e-8)
    white = (basis * lam.rsqrt()) @ basis.T
    x = c @ white.to(c.dtype)
    root = ((basis * lam.pow(0.25)) @ basis.T).to(c.dtype)
    opt = torch.optim.LBFGS([root], max_iter=steps, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def relative_variance() -> torch.Tensor:
        # var(q) / mean(q)^2 and its gradient, written out: two matrix products per evaluation,
        # about a third less time than autograd's
        y = x @ root.T
        q = y.pow(2).sum(-1)
        mean = q.mean()
        dev = q - mean
        var = dev.pow(2).sum() / max(n - 1, 1)
        dq = (2 / mean.pow(2)) * (dev / max(n - 1, 1) - var / (mean * n))
        root.grad = 2 * (y * dq[:, None]).T @ x
        return var / mean.pow(2)

    opt.step(relative_variance)
    return root.double() @ white


def _bounded_scales(c: torch.Tensor, v: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """m = s^2 in [max / NATIVE_METRIC_CONDITION^2, max] minimizing the relative variance of
    q = sum_k m_k (v_k^T c)^2 (a quadratic over a squared linear function of m, from the moments of
    (v_k^T c)^2), by L-BFGS-B from `start` clipped to the bound."""
    z = (c @ v.to(c.dtype)).pow(2)
    mean = z.mean(0)
    dev = z - mean
    cov = ((dev.T @ dev).double() / max(len(z) - 1, 1)).cpu().numpy()
    mean = mean.double().cpu().numpy()

    def relative_variance(m: np.ndarray) -> tuple[float, np.ndarray]:
        a, cm = mean @ m, cov @ m
        b = m @ cm
        return b / a**2, 2 * cm / a**2 - 2 * b * mean / a**3

    low = NATIVE_METRIC_CONDITION**-2
    start = start.double().cpu().numpy()
    m0 = np.clip(start / max(start.max(), 1e-300), low, 1.0)
    m = minimize(relative_variance, m0, jac=True, method="L-BFGS-B", bounds=[(low, 1.0)] * len(m0)).x
    return torch.from_numpy(np.clip(m, low, 1.0)).to(v.device)


def native_transform(kv_a: torch.Tensor, rank: int, sample: torch.Tensor,
                     steps: int = NATIVE_METRIC_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha diag(s) V^T, 1 / s): the latent's transform from `latent_metric` fitted on a sample of
    plain latents, scaled so that the native latent rows have the rms of the rope rows beside them
    (one scale per tensor or per block then fits both; the norm makes the scale free), and the
    kv_a_layernorm weight that gives each row its own scale back after the norm, where no
    quantizer sees it."""
    s, v = (t.to(kv_a.device) for t in latent_metric(sample, steps))
    t = s[:, None] * v.T
    latent = t @ kv_a[:rank].double()
    rope_rms = kv_a[rank:].double().pow(2).mean().sqrt()
    return t * (rope_rms / latent.pow(2).mean().sqrt().clamp_min(1e-30)), 1 / s


def native_attention(w: MLAWeights, moments: LatentMoments) -> MLAWeights:
    """Plain weights (kv_a_layernorm as identity) in the native latent format: latent rows
    transform @ L and kv_a_layernorm = weight * g (`native_transform`), kv_b_proj = kv_b C / g
    (`LatentMoments`), with g the rms of C's entries times sqrt(rank), so that kv_b_proj keeps its
    plain scale. Approximate: exact only when the transformed latent's rms is constant over inputs."""
    rank = w.kv_b.shape[1]
    dev = w.kv_b.device
    c = moments.refit().to(dev)
    g = c.pow(2).mean().sqrt().item() * math.sqrt(rank)
    kv_b = w.kv_b.double() @ c / g
    latent = moments.transform.to(dev) @ w.kv_a[:rank].double()
    return MLAWeights(w.q, torch.cat([latent.float(), w.kv_a[rank:]]), (moments.weight.to(dev) * g).float(),
                      kv_b.float(), w.o)


def fit_native(w: MLAWeights, latents: list[torch.Tensor], steps: int = NATIVE_METRIC_STEPS,
               seed: int = 0) -> MLAWeights:
    """Plain weights `w` in the native latent format, fitted on the plain latents (`x @ latent rows`)
    of calibration inputs: the latent metric on a random NATIVE_METRIC_TOKENS of them
    (`native_transform`), then kv_b_proj refitted on all of them (`LatentMoments`)."""
    rank = w.kv_b.shape[1]
    flat = torch.cat([c.reshape(-1, rank) for c in latents])
    pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:NATIVE_METRIC_TOKENS]
    moments = LatentMoments(*native_transform(w.kv_a, rank, flat[pick.to(flat.device)], steps))
    del flat
    for c in latents:
        moments.update(c)
    return native_attention(w, moments)


def latent_is_linear(kv_a_latent: torch.Tensor, input_gamma: torch.Tensor, hidden: int) -> bool:
    """Whether stored latent rows are in `latent_norm_trick`'s linear regime (the exact format) rather
    than the native one: the worst-case mean square stays far below eps. The two regimes are many
    orders of magnitude apart, so a loose threshold separates them in any dtype."""
    rank = kv_a_latent.shape[0]
    bound = torch.linalg.matrix_norm(kv_a_latent.double() * input_gamma.double().to(kv_a_latent.device),
                                     ord=2).item() * math.sqrt(hidden)
    return bound**2 / rank <= LINEAR_REGIME * LATENT_NORM_EPS


def format_attention(i: int, w: MLAWeights, input_gamma: torch.Tensor, hidden: int,
                     native: bool = False) -> dict[str, torch.Tensor]:
    """Layer i's attention tensors in the output format. Exact format: from plain weights, trick
    applied. Native format (`native`): `w` is already native (see `native_attention`), written as is."""
    rank = w.kv_b.shape[1]
    names = attention_names(i)
    if native:
        kv_a, norm = w.kv_a.float(), w.kv_norm.float()
    else:
        latent, scale = latent_norm_trick(w.kv_a[:rank].double(), input_gamma.double(), hidden)
        kv_a = torch.cat([latent.float(), w.kv_a[rank:].float()])
        norm = scale.float() * w.kv_norm.float().to(scale.device)
    return {
        names["q_proj"]: w.q,
        names["kv_a_proj_with_mqa"]: kv_a,
        names["kv_a_layernorm"]: norm,
        names["kv_b_proj"]: w.kv_b,
        names["o_proj"]: w.o,
    }


def pad_latent(tensors: dict[str, torch.Tensor], i: int, rank: int) -> dict[str, torch.Tensor]:
    """Layer i's stored attention tensors with the latent zero-padded to `rank`: zero latent rows in
    kv_a_proj_with_mqa (before the rope rows), zero kv_a_layernorm weights and zero kv_b_proj columns,
    so that an engine that takes only certain latent widths serves a latent the source fills less.

    A zero latent dim adds nothing to any key or value. The exact format's norm stays linear (padding
    only lowers the mean square): bit-exact. The native format's norm averages over `rank` dims instead
    of the `filled` ones, which scales its output by sqrt(rank / filled); the norm weights of the real
    dims are scaled down by as much (rounded once to the stored dtype). What is left is eps's share,
    a relative (rank / filled - 1) * eps / (2 * mean square of the latent): below float32's precision
    for a native latent, whose rows have the rope rows' scale."""
    names = attention_names(i)
    kv_a, norm, kv_b = (tensors[names[k]] for k in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"))
    filled = kv_b.shape[1]
    if rank < filled:
        raise ValueError(f"cannot pad a latent of {filled} to {rank}")
    gamma = tensors[f"model.layers.{i}.input_layernorm.weight"]
    linear = latent_is_linear(kv_a[:filled].float(), gamma.float(), gamma.shape[0])
    scale = 1.0 if linear else math.sqrt(filled / rank)
    extra = rank - filled
    return {
        **tensors,
        names["kv_a_proj_with_mqa"]: torch.cat([kv_a[:filled], kv_a.new_zeros(extra, kv_a.shape[1]), kv_a[filled:]]),
        names["kv_a_layernorm"]: torch.cat([(norm.double() * scale).to(norm.dtype), norm.new_zeros(extra)]),
        names["kv_b_proj"]: torch.cat([kv_b, kv_b.new_zeros(kv_b.shape[0], extra)], dim=1),
    }


def plain_attention(get: Callable[[str], torch.Tensor], i: int, rank: int) -> MLAWeights:
    """Layer i's attention as stored (`get` reads a tensor by name), in the plain linear
    parametrization (trick undone, kv_a_layernorm as identity), float32."""
    names = attention_names(i)
    kv_a = get(names["kv_a_proj_with_mqa"]).float()
    latent = plain_latent(kv_a[:rank], get(names["kv_a_layernorm"]).float())
    return MLAWeights(
        q=get(names["q_proj"]).float(),
        kv_a=torch.cat([latent, kv_a[rank:]]),
        kv_norm=torch.ones(rank, device=kv_a.device),
        kv_b=get(names["kv_b_proj"]).float(),
        o=get(names["o_proj"]).float(),
    )
