"""Functional forward passes of one source decoder layer and of one MLA attention block.

Conversion, calibration and validation run layers one at a time on carried hidden states, so they
need the layer math without building whole transformers models. Tests pin both functions to
transformers' Llama and DeepSeek-V3 modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlakit.core.families import SourceLayer, SourceSpec

ACTIVATION_BYTES = 2**28


def row_chunks(n_rows: int, seq_len: int, width: int) -> list[slice]:
    """Row slices whose activations of `width` floats per token stay near ACTIVATION_BYTES, so
    that calibration passes run in bounded memory whatever the number of rows."""
    step = max(1, ACTIVATION_BYTES // (4 * seq_len * width))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(inv_freq: torch.Tensor, seq_len: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, n_freq) for positions 0..seq_len-1."""
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return angles.cos() * scaling, angles.sin() * scaling


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (..., L, d) in the rotate-half layout: pairs (i, i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (..., L, r) in the interleaved layout: pairs (2i, 2i + 1)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def source_qkv(x: torch.Tensor, layer: SourceLayer, spec: SourceSpec, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated queries (B, H, L, d), rotated keys and values (B, G, L, d) of a normed input."""
    b, n, _ = x.shape
    d = spec.head_dim
    q = linear(x, layer.q, layer.q_bias).view(b, n, spec.heads, d).transpose(1, 2)
    k = linear(x, layer.k, layer.k_bias).view(b, n, spec.kv_heads, d).transpose(1, 2)
    v = linear(x, layer.v, layer.v_bias).view(b, n, spec.kv_heads, d).transpose(1, 2)
    c, s = cos[:n].to(x.dtype), sin[:n].to(x.dtype)
    return rotate_half_rope(q, c, s), rotate_half_rope(k, c, s), v


def source_attention(x: torch.Tensor, layer: SourceLayer, spec: SourceSpec, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """Causal GQA self-attention of a normed input, through o_proj."""
    return attend(*source_qkv(x, layer, spec, cos, sin), layer, spec)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: SourceLayer, spec: SourceSpec) -> torch.Tensor:
    """Causal GQA attention of rotated queries, keys and values (`source_qkv`), through o_proj."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=spec.head_dim**-0.5)
    return linear(out.transpose(1, 2).flatten(2), layer.o)


def attention_distance_histogram(q: torch.Tensor, k: torch.Tensor, spec: SourceSpec) -> torch.Tensor:
    """Sum over batch and query positions of the attention mass at each distance t - s: shape (H, L),
    from rotated queries (B, H, L, d) and keys (B, G, L, d).

    Query positions go in blocks so that one (B, H, block, keys) score tile is alive at a time,
    whatever L; each tile's mass lands on its distances in one index_add. Everything is made on
    the input's device."""
    k = k.repeat_interleave(spec.group, dim=1)
    b, h, n, _ = q.shape
    pos = torch.arange(n, device=q.device)
    hist = torch.zeros(h, n, dtype=torch.float64, device=q.device)
    step = max(1, min(n, ACTIVATION_BYTES // (4 * b * h * n)))
    for t0 in range(0, n, step):
        t1 = min(t0 + step, n)
        delta = pos[t0:t1, None] - pos[None, :t1]  # (block, keys): distance of each key
        scores = (q[:, :, t0:t1] @ k[:, :, :t1].transpose(-1, -2)).float() * spec.head_dim**-0.5
        mass = scores.masked_fill_(delta < 0, float("-inf")).softmax(-1).sum(0)  # (H, block, keys)
        tile = torch.zeros(h, n, dtype=torch.float32, device=q.device)
        hist += tile.index_add_(1, delta.clamp_min(0).flatten(), mass.reshape(h, -1))
    return hist


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def source_layer(h: torch.Tensor, layer: SourceLayer, spec: SourceSpec, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """One whole source decoder layer on hidden states (B, L, D)."""
    h = h + source_attention(rms_norm(h, layer.input_norm, spec.rms_eps), layer, spec, cos, sin)
    return h + mlp(rms_norm(h, layer.post_norm, spec.rms_eps), layer.gate, layer.up, layer.down)


@dataclass
class MLAWeights:
    """One MLA attention block in DeepSeek-V3 layout. `kv_a` holds latent rows then rope rows
    (interleaved); `kv_norm` is kv_a_layernorm's weight."""

    q: torch.Tensor
    kv_a: torch.Tensor
    kv_norm: torch.Tensor
    kv_b: torch.Tensor
    o: torch.Tensor


def mla_attention(x: torch.Tensor, w: MLAWeights, heads: int, qk_nope: int, qk_rope: int, v_head: int,
                  cos: torch.Tensor, sin: torch.Tensor, norm_eps: float | None = 1e-6,
                  scale: float | None = None) -> torch.Tensor:
    """DeepSeek-V3 attention (q_lora_rank None, interleaved rope) of a normed input, through o_proj.

    `norm_eps=None` skips kv_a_layernorm (the plain linear parametrization used while fitting)."""
    return linear(mla_heads(x, w, heads, qk_nope, qk_rope, v_head, cos, sin, norm_eps, scale), w.o)


def mla_heads(x: torch.Tensor, w: MLAWeights, heads: int, qk_nope: int, qk_rope: int, v_head: int,
              cos: torch.Tensor, sin: torch.Tensor, norm_eps: float | None = 1e-6,
              scale: float | None = None) -> torch.Tensor:
    """`mla_attention` before o_proj: the heads' outputs (B, L, heads * v_head), which o_proj maps
    linearly, so that o_proj can be fitted by least squares."""
    q, k, v = mla_qkv(x, w, heads, qk_nope, qk_rope, v_head, cos, sin, norm_eps)
    # SDPA's fused CPU kernel takes one head size for q, k and v; with two it falls back to the
    # math path, which holds the whole (B, H, L, L) score tensor and is twice as slow. Zeros
    # appended to the smaller heads change neither the scores nor the output's first v_head dims.
    width = max(q.shape[-1], v_head)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale or (qk_nope + qk_rope)**-0.5)
    return out[..., :v_head].transpose(1, 2).flatten(2)


def mla_qkv(x: torch.Tensor, w: MLAWeights, heads: int, qk_nope: int, qk_rope: int, v_head: int,
            cos: torch.Tensor, sin: torch.Tensor, norm_eps: float | None = 1e-6):
    """Rotated queries and keys (B, heads, L, qk_nope + qk_rope) and values (B, heads, L, v_head)
    of DeepSeek-V3 attention on a normed input."""
    b, n, _ = x.shape
    rank = w.kv_b.shape[1]
    qk_head = qk_nope + qk_rope
    q = linear(x, w.q).view(b, n, heads, qk_head).transpose(1, 2)
    q_nope, q_rot = q.split([qk_nope, qk_rope], dim=-1)
    latent, k_rot = linear(x, w.kv_a).split([rank, qk_rope], dim=-1)
    latent = latent if norm_eps is None else rms_norm(latent, w.kv_norm, norm_eps)
    kv = linear(latent, w.kv_b).view(b, n, heads, qk_nope + v_head).transpose(1, 2)
    k_nope, v = kv.split([qk_nope, v_head], dim=-1)
    c, s = cos[:n].to(x.dtype), sin[:n].to(x.dtype)
    q_rot = interleaved_rope(q_rot, c, s)
    k_rot = interleaved_rope(k_rot[:, None], c, s).expand(b, heads, n, qk_rope)
    return torch.cat([q_nope, q_rot], dim=-1), torch.cat([k_nope, k_rot], dim=-1), v
