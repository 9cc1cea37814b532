"""The native latent format: the latent at its natural scale and kv_a_layernorm really normalizing.

The exact format (`latent_norm_trick`) keeps the latent so small that the norm is linear, and
quantization (f16, q8_0, fp8) destroys rows that small. The native format keeps every weight at a
normal scale; the norm's non-linearity is absorbed by a closed-form least-squares refit of
kv_b_proj on the normalized latents of the calibration text (`LatentMoments`). This pass reads an
exact-format conversion layer by layer, carries the calibration hidden states through the layers it
has already made native, and writes the native model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from mlakit.calibrate.export import as_stored
from mlakit.calibrate.layers import Student
from mlakit.core.checkpoint import Export, read_json, write_json
from mlakit.core.deepseek import (
    LATENT_NORM_EPS,
    NATIVE_METRIC_STEPS,
    NATIVE_METRIC_TOKENS,
    LatentMoments,
    format_attention,
    native_attention,
    native_transform,
)
from mlakit.core.errors import MlakitError
from mlakit.core.forward import linear, rms_norm, row_chunks
from mlakit.core.guard import RECORD, atomic_folder, check_output, output_lock, scratch_folder


@torch.no_grad()
def refit_native(converted: Path, folder: Path, windows: torch.Tensor, device: str,
                 metric_steps: int = NATIVE_METRIC_STEPS, log: Callable[[str], None] | None = None) -> list[dict]:
    """Write CONVERTED (exact format) into `folder` in the native format; per layer, the relative
    error of the native attention output against the exact one on the calibration windows.
    A progress bar, or one line per layer to `log` when stderr is not a terminal."""
    seq_len = windows.shape[1]
    student = Student(converted, seq_len, device)
    hidden, rank = student.config.hidden_size, student.config.kv_lora_rank
    ids = windows.to(device)
    pos = torch.arange(seq_len, device=device).expand_as(ids)
    chunks = row_chunks(len(ids), seq_len, max(student.dims[0] * seq_len, student.config.intermediate_size))
    h = torch.cat([student.embed(ids[c]) for c in chunks])
    export = Export(converted, folder)
    gen = torch.Generator().manual_seed(0)
    reports = []
    bar = tqdm(range(student.layers), desc="native latent", unit="layer", leave=False, disable=None)
    for i in bar:
        start = time.perf_counter()
        layer = student.layer(i)
        if layer.norm_eps is not None:
            raise MlakitError(f"{converted}: layer {i} is already in the native latent format")
        w = layer.attn
        latents = [linear(rms_norm(h[c], layer.input_norm, student.eps), w.kv_a[:rank]) for c in chunks]
        sample = torch.cat(latents).flatten(0, 1)
        sample = sample[torch.randperm(len(sample), generator=gen, device="cpu")[:NATIVE_METRIC_TOKENS].to(device)]
        moments = LatentMoments(*native_transform(w.kv_a, rank, sample, metric_steps))
        for c in latents:
            moments.update(c)
        del latents, sample
        native = native_attention(w, moments)
        export.add(format_attention(i, native, layer.input_norm, hidden, native=True))
        stored = as_stored(i, native, layer.input_norm, hidden, export.dtype, native=True)
        err = energy = 0.0
        for c in chunks:
            x = rms_norm(h[c], layer.input_norm, student.eps)
            ref = student.attention(x, w, pos[c])
            err += (student.attention(x, stored, pos[c], LATENT_NORM_EPS) - ref).pow(2).sum().item()
            energy += ref.pow(2).sum().item()
        reports.append({"layer": i, "attn_rel_error": math.sqrt(err / max(energy, 1e-300))})
        fitted = replace(layer, attn=stored, norm_eps=LATENT_NORM_EPS)
        for c in chunks:
            h[c] = student.forward_layer(h[c], fitted, pos[c])
        if log and bar.disable:
            log(f"native latent: layer {i + 1}/{student.layers} in {time.perf_counter() - start:.1f} s, attention "
                f"error against the exact format {reports[-1]['attn_rel_error']:.4f}")
    export.close()
    return reports


def convert_native(source: str, out: Path, convert: Callable[[str, Path], dict],
                   windows: Callable[[], torch.Tensor], device: str, force: bool,
                   metric_steps: int = NATIVE_METRIC_STEPS, log: Callable[[str], None] | None = None) -> dict:
    """`convert(source, folder)` into a staging folder beside OUT (exact format), then the native pass
    on the same calibration windows (`windows()`) into OUT; returns the record with the native
    layers' errors."""
    check_output(out, force)
    with output_lock(out), scratch_folder(out, "exact") as stage:
        exact = stage / "exact"
        convert(source, exact)
        record = read_json(exact / RECORD)
        with atomic_folder(out, force) as tmp:
            layers = refit_native(exact, tmp, windows(), device, metric_steps, log)
            record["latent"] = {"format": "native", "layers": layers}
            write_json(tmp / RECORD, record)
        return record


def native_summary(record: dict) -> str:
    """The line a user reads after a native conversion."""
    errors = [row["attn_rel_error"] for row in record["latent"]["layers"]]
    return (f"native latent: kv_b_proj refitted to the normalized latent; attention error against the exact "
            f"format {sum(errors) / len(errors):.4f} mean, {max(errors):.4f} worst layer")
