"""RoPE across heads: the interleave permutation, the frequency budget and RoRoPE.

Keys and queries are handled as complex numbers per frequency (z = x[i] + 1j * x[i + d/2] in the
source's rotate-half layout), because RoPE multiplies each such pair by exp(1j * w * position):
any mixing across kv heads that is the same for both halves of a pair commutes with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

STRATEGIES = ("fold", "even", "high")  # foldN (N slots per group) is valid too


def interleave_permutation(dim: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Indices p with interleaved[j] = rotate_half[p[j]]: pair (i, i + dim/2) becomes (2i, 2i + 1)."""
    half = torch.arange(dim // 2, device=device)
    return torch.stack([half, half + dim // 2], dim=1).flatten()


def to_complex(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * d, D) real weight rows in rotate-half layout -> (heads, d/2, D) complex rows."""
    re, im = rows.double().view(heads, 2, -1, rows.shape[-1]).unbind(1)
    return torch.complex(re, im)


def to_real(rows: torch.Tensor) -> torch.Tensor:
    """(..., F, D) complex rows -> (..., 2F, D) real rows in rotate-half layout."""
    return torch.cat([rows.real, rows.imag], dim=-2)


def to_interleaved(rows: torch.Tensor) -> torch.Tensor:
    """(..., F, D) complex rows -> (..., 2F, D) real rows in interleaved layout."""
    return to_real(rows)[..., interleave_permutation(2 * rows.shape[-2], rows.device), :]


def slot_groups(n_freq: int, n_slots: int, strategy: str) -> list[tuple[list[int], list[int]]]:
    """Which source frequencies share which kept rotary slots: (frequencies, slots) per group.

    Slot m rotates at source frequency m * n_freq / n_slots (m for `high`).
    fold: each group takes `n_freq / n_slots` neighbouring frequencies into one slot (PCA over all
      of them); foldN: N times as many frequencies into N neighbouring slots, so the PCA chooses
      which heads and frequencies keep their rotation (TransMLA's FreqFold);
    even: each slot keeps the first of its neighbours, the rest lose rotation;
    high: slot m keeps frequency m (the highest ones); the low ones lose rotation.
    """
    ratio = n_freq // n_slots
    if strategy.startswith("fold"):
        width = int(strategy[4:] or 1)
        return [(list(range(m * ratio, (m + width) * ratio)), list(range(m, m + width)))
                for m in range(0, n_slots, width)]
    if strategy == "even":
        return [([m * ratio], [m]) for m in range(n_slots)]
    if strategy == "high":
        return [([m], [m]) for m in range(n_slots)]
    raise ValueError(f"unknown rope strategy {strategy}")


def kept_frequencies(n_freq: int, n_slots: int, strategy: str) -> list[int]:
    """The source frequency each slot rotates at."""
    return list(range(n_slots)) if strategy == "high" else [m * (n_freq // n_slots) for m in range(n_slots)]


def valid_strategy(strategy: str, n_slots: int) -> bool:
    if strategy in ("fold", "even", "high"):
        return True
    width = strategy[4:]
    return strategy.startswith("fold") and width.isdigit() and int(width) >= 1 and n_slots % int(width) == 0


def target_theta(theta: float, head_dim: int, rope_dim: int, strategy: str) -> float:
    """rope_theta of the output so that slot m rotates at its first source frequency."""
    return theta ** (rope_dim / head_dim) if strategy == "high" else theta


def llama3_as_yarn(llama3: dict, kept_freq: torch.Tensor, yarn_freq: Callable[[dict], torch.Tensor],
                   betas: tuple[float, float], mscale: float) -> tuple[dict, float]:
    """YaRN parameters whose frequencies best match a llama3-scaled source's kept frequencies.

    beta_fast/beta_slow are fixed (llama.cpp reads no others) and so is factor (the frequencies past
    the ramp stay exact); original_max_position_embeddings, which places the ramp, is fitted on the
    worst relative frequency error, never below the source's (vLLM serves factor times it). attention
    factor 1 and the given mscales keep every engine from rescaling attention. Returns the parameters
    and their worst relative error."""
    base = {
        "rope_type": "yarn", "rope_theta": llama3["rope_theta"], "factor": llama3["factor"],
        "beta_fast": betas[0], "beta_slow": betas[1], "attention_factor": 1.0, "mscale": mscale,
        "mscale_all_dim": mscale,
    }
    orig = llama3["original_max_position_embeddings"]
    best = (float("inf"), base)
    for step in range(33):  # the source's context up to 4x it, in sixteenths of an octave
        params = {**base, "original_max_position_embeddings": round(orig * 2 ** (step / 16))}
        err = ((yarn_freq(params).double() - kept_freq.double()).abs() / kept_freq.double()).max().item()
        best = min(best, (err, params), key=lambda t: t[0])
    return best[1], best[0]


def expected_rotation(dist: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """E[exp(-1j * w * (t - s))] under each head's attention distance distribution, on dist's device.

    dist: (H, L) attention mass at distance 0..L-1 (any scale); freqs: (...,) -> (H, ...)."""
    p = dist.double() / dist.double().sum(-1, keepdim=True)
    delta = torch.arange(dist.shape[-1], dtype=torch.float64, device=dist.device)
    phase = torch.exp(-1j * freqs.to(dist.device).double().reshape(-1, 1) * delta)  # (n, L)
    return (p.to(torch.complex128) @ phase.T).reshape(dist.shape[0], *freqs.shape)


def principal_directions(cov: torch.Tensor, n: int) -> torch.Tensor:
    """The top-n unit eigenvectors (columns) of a Hermitian (or real symmetric) matrix, each with
    a fixed phase."""
    _, vecs = torch.linalg.eigh(cov)
    top = vecs[:, -n:].flip(-1)
    pivot = top.gather(0, top.abs().argmax(0, keepdim=True))
    return top * (pivot.abs() / pivot)


def _times_real(rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Complex rows times a real matrix as two real products (much faster than complex BLAS on CPU)."""
    return torch.complex(rows.real.contiguous() @ real, rows.imag.contiguous() @ real)


@dataclass
class RopeSplit:
    """Source keys and queries split into a shared rotary key and per-group no-rope keys.

    k_rot (M, D) and q_rot (H, M, D): complex rows of the kept slots; k_nope (G, F, D): what each
    group's key keeps without rotation; q_nope (H, F, D): the matching query rows."""

    k_rot: torch.Tensor
    q_rot: torch.Tensor
    k_nope: torch.Tensor
    q_nope: torch.Tensor
    energy_kept: float


def rorope(k: torch.Tensor, q: torch.Tensor, sigma: torch.Tensor, src_freq: torch.Tensor,
           tgt_freq: torch.Tensor, slot_freqs: list[tuple[list[int], list[int]]], *, complex_pca: bool = True,
           dist: torch.Tensor | None = None, k_bias_rows: torch.Tensor | None = None,
           bias_residual: float = 0.0) -> RopeSplit:
    """RoRoPE: per slot, rotate the keys of all kv heads (and folded frequencies) onto their
    principal direction; component 0 keeps RoPE as the shared k_rot, the rest lose rotation.

    k: (G, F, D) complex key rows; q: (H, F, D) complex query rows; sigma: (D, D) second moment of
    the layer input. `dist` (H, L) turns lost rotations into their expectation under each head's
    attention distances (else they are dropped, i.e. replaced by the identity), and weights each
    channel by what losing its rotation costs the scores: the energy of the queries that read it
    times 1 - |E[rotation]|^2. The weighted principal direction u~ gives k_rot = (w^1/2 u~)^H k and
    per-channel loadings w^-1/2 u~ (an oblique split, orthogonal when all weights are equal).
    `k_bias_rows` (G, F, D), if given, are a k bias absorbed into the weights (`absorb_bias` minus
    the weights): they enter the rotary component only, since on dims that lose their rotation a k
    bias adds q . E[R] b to every score of a query, which softmax removes. Absorption is inexact: it
    leaves a per-token error of b times a residual whose mean square is `bias_residual`, against
    the b-sized bias, so a large bias on a channel that barely rotates over the attended distances
    (variance 1 - |E[R]|^2 under the query heads' energies, v) is mostly noise once absorbed. Each
    channel keeps the share v / (v + bias_residual) of its bias, which minimizes the sum of the two
    errors (the bias's lost rotation, (1 - share)^2 v, and the absorption's, share^2 residual).

    Runs on the device of `k`, where every tensor argument must be (the frequencies may be on the host).
    """
    groups, n_freq, _ = k.shape
    heads, dev = q.shape[0], k.device
    group_of = torch.arange(heads, device=dev) // (heads // groups)
    sig = sigma.double()
    lost = torch.ones(heads, n_freq, dtype=torch.complex128, device=dev)
    channel_weight = torch.ones(groups, n_freq, dtype=torch.float64, device=dev)
    bias_share = torch.ones(groups, n_freq, dtype=torch.float64, device=dev)
    if dist is not None:
        lost = expected_rotation(dist, src_freq).conj()
        q_energy = (_times_real(q, sig) * q.conj()).sum(-1).real
        head_weight = q_energy * (1 - lost.abs() ** 2).clamp_min(0)
        channel_weight = torch.zeros_like(bias_share).index_add_(0, group_of, head_weight)
        group_energy = torch.zeros_like(bias_share).index_add_(0, group_of, q_energy)
        variance = channel_weight / group_energy.clamp_min(1e-300)
        bias_share = variance / (variance + bias_residual).clamp_min(1e-300)
    k_rot_src = k if k_bias_rows is None else k + bias_share[..., None] * k_bias_rows
    k_nope = k.clone()
    n_slots = sum(len(slots) for _, slots in slot_freqs)
    k_rot = torch.zeros(n_slots, k.shape[-1], dtype=k.dtype, device=dev)
    q_rot = torch.zeros(heads, n_slots, q.shape[-1], dtype=q.dtype, device=dev)
    kept = total = 0.0
    flat = k_rot_src.reshape(groups * n_freq, -1)
    cov_all = _times_real(flat, sig) @ flat.conj().T  # every (kv head, frequency) pair at once
    for fs, ms in slot_freqs:
        fs_t = torch.tensor(fs, device=dev)
        idx = (torch.arange(groups, device=dev)[:, None] * n_freq + fs_t[None, :]).reshape(-1)
        rows = flat[idx]
        cov = cov_all[idx][:, idx]
        total += cov.diagonal().real.sum().item()
        w = channel_weight[:, fs].reshape(-1)
        root = (w / w.max().clamp_min(1e-300)).clamp_min(1e-3).sqrt().to(torch.complex128)
        weighted = root[:, None] * cov * root[None, :]
        top = principal_directions(weighted if complex_pca else weighted.real, len(ms)).to(torch.complex128)
        nope_rows = k[:, fs].reshape(groups * len(fs), -1)
        freq_of = fs_t.repeat(groups)
        # components go to slots in order of their energy-weighted mean source frequency
        order = (top.abs() ** 2 * freq_of[:, None]).sum(0).argsort()
        for m, j in zip(ms, order.tolist()):
            u = top[:, j]
            read = u * root / (u * root).norm()
            load = u / root * (u * root).norm()
            kept += ((read.conj() @ cov @ read).real * (load.conj() @ load).real).item()
            k_rot[m] = read.conj() @ rows
            nope_rows = nope_rows - load[:, None] * (read.conj() @ nope_rows)
            load_g = load.view(groups, len(fs))[group_of]  # (H, |fs|)
            mismatch = torch.ones(heads, len(fs), dtype=torch.complex128, device=dev)
            if dist is not None:
                mismatch = expected_rotation(dist, src_freq[fs] - tgt_freq[m]).conj()
            q_rot[:, m] = ((load_g.conj() * mismatch)[..., None] * q[:, fs]).sum(1)
        k_nope[:, fs] = nope_rows.view(groups, len(fs), -1)
    return RopeSplit(k_rot, q_rot, k_nope, lost[..., None] * q, kept / max(total, 1e-30))
