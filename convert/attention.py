"""One layer's attention written as MLA: the weights from the source layer, its calibration
statistics and a rope candidate, and the padding between the source's head sizes and the format's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlakit.convert import rope
from mlakit.convert.candidates import Candidate
from mlakit.convert.factorize import SecondMoment, absorb_bias, absorb_residual, joint_latent
from mlakit.convert.plan import ConvertOptions, value_dim
from mlakit.core import deepseek
from mlakit.core.families import SourceLayer, SourceSpec
from mlakit.core.forward import MLAWeights


def convert_attention(layer: SourceLayer, spec: SourceSpec, shape: deepseek.MLAShape, stats: SecondMoment,
                      dist: torch.Tensor | None, cand: Candidate, opts: ConvertOptions) -> tuple[MLAWeights, dict]:
    """One layer's attention as MLA: RoRoPE, joint latent, per-head up-projections, q scaling.

    The factorization runs in float64 on the device of the layer's statistics (the conversion's
    --device, where the pipeline already holds the layer and `dist`), so that with a GPU its
    products and eigensolvers run there instead of on copies on the host. Returns plain weights
    (kv_a_layernorm as identity) in float32 on the host, where the writer takes them, and the
    layer's fit numbers."""
    H, G, d, D = spec.heads, spec.kv_heads, spec.head_dim, spec.hidden
    dev = stats.device
    layer = layer.to(dev)
    raw, mean = stats.sigma, stats.mean
    q = rope.to_complex(absorb_bias(layer.q, layer.q_bias, raw, mean), H)
    k = rope.to_complex(layer.k, G)
    k_bias_rows, residual = None, 0.0
    if layer.k_bias is not None:
        k_bias_rows = rope.to_complex(absorb_bias(layer.k, layer.k_bias, raw, mean), G) - k
        residual = absorb_residual(raw, mean)
    v = absorb_bias(layer.v, layer.v_bias, raw, mean)
    sigma = stats.shrunk(opts.moment_shrink)
    split = rope.rorope(
        k, q, sigma, cand.src_freq, cand.tgt_freq, rope.slot_groups(d // 2, shape.qk_rope // 2, cand.strategy),
        complex_pca=opts.complex_pca, dist=dist.to(dev) if dist is not None else None, k_bias_rows=k_bias_rows,
        bias_residual=residual,
    )
    k_nope = rope.to_real(split.k_nope).reshape(G * d, D)
    group_of = torch.arange(H, device=dev) // (H // G)
    k_metric = v_metric = None
    if opts.output_aware:
        q_nope_real = rope.to_real(split.q_nope)  # (H, d, D)
        # E[q q^T] per head: H d^2 D^2 multiply-adds (68 G at 8B shapes), a weighting, so float32 suffices
        q32 = q_nope_real.float()
        per_head_q = (q32 @ sigma.float() @ q32.transpose(1, 2)).double()
        o_heads = layer.o.double().view(D, H, d).permute(1, 2, 0)  # (H, d, D)
        per_head_o = o_heads @ o_heads.transpose(1, 2)
        k_metric = torch.block_diag(*[per_head_q[group_of == g].sum(0) for g in range(G)])
        v_metric = torch.block_diag(*[per_head_o[group_of == g].sum(0) for g in range(G)])
    latent = joint_latent(k_nope, v, sigma, shape.kv_lora_rank, activation_aware=opts.activation_aware,
                          balance=opts.balance, k_metric=k_metric, v_metric=v_metric, key_weight=opts.key_weight)
    q_scale = math.sqrt(shape.qk_head / d) * cand.src_scaling**2
    q_nope = F.pad(rope.to_real(split.q_nope), (0, 0, 0, shape.qk_nope - d))
    q_rows = torch.cat([q_nope, rope.to_interleaved(split.q_rot)], dim=1).reshape(-1, D) * q_scale
    k_up = F.pad(latent.k_up.view(G, d, -1)[group_of], (0, 0, 0, shape.qk_nope - d))
    v_rows = latent.v_up.view(G, d, -1)
    extra = value_dim(spec, shape, opts) - d
    if extra:
        v_rows = torch.cat([v_rows, extra_value_rows(v_rows, latent.down, sigma, extra)], dim=1)
    v_up = F.pad(v_rows[group_of], (0, 0, 0, shape.v_head - v_rows.shape[1]))
    o = F.pad(layer.o.double().view(D, H, d), (0, shape.v_head - d)).reshape(D, -1)
    weights = MLAWeights(
        q=q_rows.float().cpu(),
        kv_a=torch.cat([latent.down, rope.to_interleaved(split.k_rot)]).float().cpu(),
        kv_norm=torch.ones(shape.kv_lora_rank),
        kv_b=torch.cat([k_up, v_up], dim=1).reshape(-1, shape.kv_lora_rank).float().cpu(),
        o=o.float().cpu(),
    )
    info = {"k_error": latent.k_error, "v_error": latent.v_error, "latent_error": latent.error,
            "latent_optimum": latent.optimum, "rope_energy_kept": split.energy_kept}
    return weights, info


def extra_value_rows(v_rows: torch.Tensor, down: torch.Tensor, sigma: torch.Tensor, n: int) -> torch.Tensor:
    """(G, n, r) value rows for the format's padded value dims: per kv head, the n latent directions
    of most energy outside the span of its value rows, scaled to their mean energy. o_proj's columns
    for them start at zero and the o_proj refit decides what they add: each head's output can then
    read latent directions (key information among them) that its d value rows leave out."""
    latent_moment = down @ sigma @ down.T
    out = []
    for rows in v_rows:
        q, _ = torch.linalg.qr(rows.T)  # (r, d): the span of the value rows
        outside = torch.eye(q.shape[0], dtype=q.dtype, device=q.device) - q @ q.T
        _, vecs = torch.linalg.eigh(outside @ latent_moment @ outside)
        extra = vecs[:, -n:].flip(-1).T
        energy = (rows @ latent_moment * rows).sum(1).mean()
        scale = (energy / (extra @ latent_moment * extra).sum(1).clamp_min(1e-300)).sqrt()
        out.append(extra * scale[:, None])
    return torch.stack(out)


def unpadded(w: MLAWeights, spec: SourceSpec, shape: deepseek.MLAShape, v_dim: int | None = None) -> MLAWeights:
    """The weights without the zero padding of the nope key and of v (qk_nope, v_head >= head_dim),
    o_proj keeping only the columns of real head outputs: the padding only multiplies zeros, so
    the fit computes exactly the same attention on the source's head sizes, for less work. `v_dim`
    keeps that many value dims (`value_dim`; default the source's head dim)."""
    d, h, nope = spec.head_dim, spec.heads, shape.qk_nope
    v_dim = v_dim or d
    q = w.q.unflatten(0, (h, shape.qk_head))
    kv_b = w.kv_b.unflatten(0, (h, nope + shape.v_head))
    return MLAWeights(
        q=torch.cat([q[:, :d], q[:, nope:]], dim=1).flatten(0, 1),
        kv_a=w.kv_a,
        kv_norm=w.kv_norm,
        kv_b=torch.cat([kv_b[:, :d], kv_b[:, nope:nope + v_dim]], dim=1).flatten(0, 1),
        o=w.o.unflatten(1, (h, shape.v_head))[..., :v_dim].flatten(1),
    )


def padded_columns(o: torch.Tensor, spec: SourceSpec, shape: deepseek.MLAShape, v_dim: int | None = None) -> torch.Tensor:
    v_dim = v_dim or spec.head_dim
    return F.pad(o.unflatten(1, (spec.heads, v_dim)), (0, shape.v_head - v_dim)).flatten(1)
