"""KV cache bytes: measured from the cache transformers really builds, and the formula it must equal.

transformers 5.24 keeps K and V of every kv head for Llama-family models, and the normalized latent
plus the rotated k_rot for DeepSeek-V3, so the bytes held by a filled `DynamicCache` are what a
serving engine pays per token. The formula is then trusted for lengths too long to fill on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from mlakit.core.checkpoint import read_json
from mlakit.core.deepseek import effective_config, mla_shape
from mlakit.core.families import load_spec


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the key and value tensors of every layer of a transformers cache."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def measure(model: PreTrainedModel, lengths: list[int], chunk: int) -> dict[int, int]:
    """Fill one DynamicCache by chunked prefill and record its bytes when it holds each length."""
    cache = DynamicCache(config=model.config)
    device = model.device
    filled, out = 0, {}
    with torch.inference_mode():
        for length in sorted(set(lengths)):
            while filled < length:
                n = min(chunk, length - filled)
                ids = torch.arange(filled, filled + n, device=device) % model.config.vocab_size
                model(input_ids=ids[None], cache=cache, use_cache=True, logits_to_keep=1)
                filled += n
            out[length] = cache_bytes(cache)
    return out


def formula_bytes_per_token(folder: Path, dtype: torch.dtype) -> int:
    """The cache size per token in `dtype`: (kv_lora_rank + qk_rope_head_dim) per layer for MLA,
    2 * kv_heads * head_dim per layer otherwise."""
    raw = read_json(folder / "config.json")
    if raw.get("model_type") == "deepseek_v3":
        per_layer = mla_shape(effective_config(raw)).kv_elements_per_token_layer()
    else:
        per_layer = load_spec(folder).kv_elements_per_token_layer()
    return per_layer * raw["num_hidden_layers"] * dtype.itemsize
