"""Which dtype a source model's matmuls run in on a device."""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def run_dtype(device: str, stored: torch.dtype) -> torch.dtype:
    """The source's stored 16-bit type where its matmuls are at least as fast as float32's on
    `device`, else float32. GPUs and CPUs with bf16 instructions (AMX, AVX512-BF16) run 16-bit
    matmuls several times faster; CPUs without them (AVX2 only) over a hundred times slower.
    Decided by timing one small product of each."""
    if stored not in (torch.bfloat16, torch.float16):
        return torch.float32
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    a = torch.randn(512, 512, device=device)
    best = {}
    for dtype in (torch.float32, stored):
        m = a.to(dtype)
        (m @ m).sum().item()
        start = clock()
        (m @ m).sum().item()
        best[dtype] = clock() - start
    return stored if best[stored] <= best[torch.float32] else torch.float32
