"""The student between the output format and the plain parametrization that training works in.

In the exact format, kv_a_proj_with_mqa's latent rows are scaled down so far that kv_a_layernorm
acts as a constant scale (the latent-norm trick, README "How the conversion works"). Optimizers
cannot work on those rows (their size is set by the trick, not by the function), so training sees
the plain rows (`plain_attention`, no latent norm) and `format_attention` re-applies the trick with
the final input norm when writing OUT. In the native format (`latent.fit_native`) the stored
weights are already at a natural scale: training runs them as stored, through the norm, and they
are written back as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DeepseekV3Config

from mlakit.core.checkpoint import Export, read_json
from mlakit.core.deepseek import attention_names
from mlakit.core.latent import format_attention, plain_attention
from mlakit.core.errors import MlakitError
from mlakit.core.forward import MLAWeights
from mlakit.core.metrics import Quality



def load_mla_config(folder: Path) -> DeepseekV3Config:
    """The converted model's config; refuse anything that is not a dense, plain-q MLA model."""
    raw = read_json(folder / "config.json")
    if raw.get("model_type") != "deepseek_v3" or "kv_lora_rank" not in raw:
        raise MlakitError(
            f"{folder} is not an MLA model (model_type {raw.get('model_type', '?')}); calibrate takes the output "
            "of mlakit convert"
        )
    if raw.get("q_lora_rank") is not None:
        raise MlakitError(f"{folder}: q_lora_rank {raw['q_lora_rank']}; calibrate trains plain q_proj models only")
    if raw.get("first_k_dense_replace", 0) < raw.get("num_hidden_layers", 0):
        raise MlakitError(f"{folder}: has mixture-of-experts layers; calibrate trains dense MLA models only")
    return DeepseekV3Config.from_pretrained(folder)


def stored_attention(get: Callable[[str], torch.Tensor], i: int, rank: int, native: bool) -> MLAWeights:
    """Layer i's attention as a loader computes it from the stored tensors (`get` reads one by name),
    float32: plain (trick undone) in the exact format, as stored in the native one."""
    if not native:
        return plain_attention(get, i, rank)
    names = attention_names(i)
    return MLAWeights(*(get(names[k]).float() for k in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                                                        "kv_b_proj", "o_proj")))


def as_stored(i: int, w: MLAWeights, input_gamma: torch.Tensor, hidden: int, dtype: torch.dtype,
              native: bool = False) -> MLAWeights:
    """The weights a loader of OUT will see, rounded to the output dtype."""
    stored = {name: t.to(dtype) for name, t in format_attention(i, w, input_gamma, hidden, native).items()}
    return stored_attention(stored.__getitem__, i, w.kv_b.shape[1], native)


def keep_better(converted: Path, folder: Path, before: Quality, after: Quality) -> str:
    """Which weights a calibration stage leaves in `folder` (its finished, not yet renamed output):
    "calibrated", or "input" when calibrating raised the held-out KL, in which case `folder` is
    rewritten with CONVERTED's weights unchanged, so that a run never makes a model worse."""
    if after.kl <= before.kl:
        return "calibrated"
    for path in folder.iterdir():
        path.unlink()
    Export(converted, folder).close()
    return "input"


def worse_warning(stage: str, before: Quality, after: Quality) -> str:
    return (f"warning: {stage} raised the held-out KL to the teacher from {before.kl:.5f} to {after.kl:.5f}; "
            "OUT holds this stage's input weights, kept unchanged")
