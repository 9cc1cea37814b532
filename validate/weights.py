"""Where the converted model's parameters differ from the source's, so that the report can say why an
MLA model with a smaller KV cache can hold more weights.

Everything outside attention and lm_head is copied by convert, so the difference is the attention
blocks (MLA's per-head up-projections and the zero padding of its head dims) plus an lm_head of its
own when the source ties it to the embeddings (DeepSeek-V3 engines need it untied).
"""

from __future__ import annotations

import math

from mlakit.core import deepseek
from mlakit.core.deepseek import expected_shapes, mla_shape
from mlakit.core.families import SourceSpec


def source_attention(spec: SourceSpec) -> dict[str, int]:
    """Parameters of one source attention block, by weight."""
    q, kv, d = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.hidden
    counts = {"q_proj": q * d, "k_proj": kv * d, "v_proj": kv * d, "o_proj": d * q}
    if spec.qkv_bias:
        counts["q/k/v biases"] = q + 2 * kv
    return counts


def mla_attention(cfg: dict) -> dict[str, int]:
    """Parameters of one MLA attention block, by weight."""
    shapes = expected_shapes({**cfg, "num_hidden_layers": 1})
    return {key: math.prod(shapes[name]) for key, name in deepseek.attention_names(0).items()}


def zero_padding(spec: SourceSpec, cfg: dict, value_dims: int | None = None) -> int:
    """Weights of one MLA block that convert writes as zeros: the rows and columns that bring a source
    head dim up to qk_nope_head_dim and v_head_dim (`deepseek.head_dims`, vLLM's prefill shapes),
    but for the value dims the conversion filled (`value_dims` per head, from mlakit.json)."""
    s, d = mla_shape(cfg), spec.head_dim
    nope, v = s.qk_nope - d, s.v_head - (value_dims or d)
    return s.heads * (nope * s.hidden + (nope + v) * s.kv_lora_rank + v * s.hidden)


def breakdown(spec: SourceSpec, cfg: dict, source_params: int, converted_params: int,
              value_dims: int | None = None) -> dict:
    """The per-layer attention counts of both models, the zero padding, the lm_head the converted model
    adds, and whatever of the measured difference in parameters these leave unexplained (0 for a
    folder written by convert)."""
    src, conv = source_attention(spec), mla_attention(cfg)
    untied = spec.vocab * spec.hidden if spec.tied else 0
    explained = spec.layers * (sum(conv.values()) - sum(src.values())) + untied
    return {
        "layers": spec.layers,
        "source_attention_per_layer": src,
        "converted_attention_per_layer": conv,
        "converted_zero_padding_per_layer": zero_padding(spec, cfg, value_dims),
        "untied_lm_head": untied,
        "unexplained": converted_params - source_params - explained,
    }


def break_even_tokens(weights: dict[str, int], per_token: dict[str, float]) -> float | None:
    """Context length (tokens held in cache, batch 1) from which the converted model's weights plus
    KV cache take fewer bytes than the source's: 0 when they never take more, None when long
    contexts never bring them below."""
    extra = weights["converted"] - weights["source"]
    saved = per_token["source"] - per_token["converted"]
    if extra <= 0 and saved >= 0:
        return 0.0
    if saved <= 0:
        return None
    return extra / saved
