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

import torch

from mlakit.core.deepseek import LATENT_NORM_EPS, attention_names
from mlakit.core.forward import MLAWeights

# The latent's mean square stays below this fraction of eps, so RMSNorm(c) = c / sqrt(eps) to 5e-7.
LATENT_NORM_MARGIN = 1e-6
# Ridge of the native format's least-squares refit, relative to the mean of the Gram diagonal.
NATIVE_RIDGE = 1e-6
# L-BFGS iterations and eigenvalue spread of the native format's latent metric.
NATIVE_METRIC_STEPS = 100
NATIVE_METRIC_CONDITION = 30.0
# Calibration latents per layer the native format's latent metric is fitted on (a random subset).
NATIVE_METRIC_TOKENS = 16384
# The metric's fit runs in float32: on the bundled demo its held-out attention error matched float64's
# (0.0275 vs 0.0276 mean over layers) at a half to a fifth of the time; its eigenbasis is taken in float64.
NATIVE_METRIC_DTYPE = torch.float32
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
    """

    def __init__(self, transform: torch.Tensor, weight: torch.Tensor):
        self.transform, self.weight = transform.double(), weight.double().to(transform.device)
        rank, device = transform.shape[0], transform.device
        self.cn = torch.zeros(rank, rank, dtype=torch.float64, device=device)
        self.nn = torch.zeros(rank, rank, dtype=torch.float64, device=device)

    def update(self, c: torch.Tensor) -> None:
        """Add plain latents c (..., rank)."""
        c = c.reshape(-1, c.shape[-1]).double()
        n = normalized_latent(c @ self.transform.T) * self.weight
        self.cn += c.T @ n
        self.nn += n.T @ n

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
    flattens it (L-BFGS on the relative variance of c^T M c). Returned in its eigenbasis so that
    each latent row gets one scale s_k of its own (mixing scales inside a row or a kv_b_proj column
    would let quantization noise of the large ones swamp the small ones); s is kept within
    NATIVE_METRIC_CONDITION of its largest value."""
    c = c.reshape(-1, c.shape[-1]).to(NATIVE_METRIC_DTYPE)
    if steps == 0:
        return (torch.ones(c.shape[1], dtype=torch.float64, device=c.device),
                torch.eye(c.shape[1], dtype=torch.float64, device=c.device))
    c = c / c.pow(2).mean().sqrt().clamp_min(1e-30)
    root = torch.eye(c.shape[1], dtype=c.dtype, device=c.device, requires_grad=True)
    opt = torch.optim.LBFGS([root], max_iter=steps, line_search_fn="strong_wolfe")

    def relative_variance() -> torch.Tensor:
        opt.zero_grad()
        q = (c @ root.T).pow(2).sum(-1)
        loss = q.var() / q.mean().pow(2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(relative_variance)
    s, v = torch.linalg.eigh(root.detach().double().T @ root.detach().double())
    s = s.clamp_min(0).sqrt()
    s = s.clamp_min(s.max() / NATIVE_METRIC_CONDITION)
    return s / s.max(), v


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
