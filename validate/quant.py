"""Weight quantization simulated in torch, and whether a converted model's latent rows survive it.

The schemes are what engines and converters store (weights only): GGUF F16 and q8_0 (llama.cpp),
per-tensor fp8 e4m3 (vLLM's fp8), per-channel int8. The exact latent format keeps its latent rows
around 1e-9..1e-7, below what f16, q8_0's f16 block scales and fp8 can hold beside the rope rows of
the same tensor; the native format keeps them at the rope rows' scale (core/latent.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Q8_BLOCK = 32


def f16(w: torch.Tensor) -> torch.Tensor:
    return w.half().float()


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0_ref: blocks of 32 along the input dim, d = amax/127 in float32 for
    rounding, stored (and used) as f16."""
    if w.shape[1] % Q8_BLOCK:
        return f16(w)  # llama.cpp falls back to a non-block type for such rows
    blocks = w.float().reshape(w.shape[0], -1, Q8_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d, torch.zeros_like(blocks)).round()
    return (q * d.half().float()).reshape(w.shape)


def fp8(w: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one float32 scale amax/448 for the whole tensor."""
    scale = w.float().abs().max().clamp_min(1e-30) / 448
    return (w.float() / scale).to(torch.float8_e4m3fn).float() * scale


def int8(w: torch.Tensor) -> torch.Tensor:
    """int8 with one float32 scale amax/127 per output channel (row)."""
    scale = w.float().abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
    return (w.float() / scale).round().clamp(-127, 127) * scale


SCHEMES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"f16": f16, "q8_0": q8_0, "fp8": fp8, "int8": int8}
SCHEME_NAMES = {"f16": "f16 (GGUF F16)", "q8_0": "q8_0 (GGUF)", "fp8": "fp8 e4m3 per tensor (vLLM)",
                "int8": "int8 per channel"}
# The latent rows survive a scheme when their relative error stays within this factor of the rope rows'.
SURVIVAL_FACTOR = 4.0


def relative_error(w: torch.Tensor, q: torch.Tensor) -> float:
    return ((q - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()


def latent_errors(kv_a: torch.Tensor, rank: int, scheme: str) -> tuple[float, float]:
    """Relative error of the latent rows and of the rope rows when kv_a_proj_with_mqa is quantized
    as a whole (per-tensor and per-block scales see both kinds of rows)."""
    q = SCHEMES[scheme](kv_a)
    return relative_error(kv_a[:rank], q[:rank]), relative_error(kv_a[rank:], q[rank:])
