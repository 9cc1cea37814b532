"""Output rope candidates: for each rope strategy, the frequencies kept, the output config and
how far its frequencies are from the source's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mlakit.convert import rope
from mlakit.convert.plan import Plan
from mlakit.core import deepseek


@dataclass
class Candidate:
    """One rope strategy: source and output frequencies, and the output config."""

    strategy: str
    src_freq: torch.Tensor
    src_scaling: float
    tgt_freq: torch.Tensor
    config: dict
    freq_error: float


def candidate(plan: Plan, strategy: str, llama3_rope: str) -> Candidate:
    """Output rope for a strategy: the source's scaling with theta moved to the kept frequencies.

    The default rope is written as YaRN with factor 1 (`deepseek.default_rope_as_yarn`: the same rope,
    which vLLM's CPU backend computes right); YaRN gets an attention factor of 1 (the source's is
    folded into q_proj) and mscales every engine reads as no rescaling; llama3 is kept, or written
    as the best-fitting YaRN within what every engine reads (llama.cpp's fixed ramp boundaries) so
    that all compute the same frequencies."""
    src = LlamaRotaryEmbedding(plan.spec.hf_config)
    params = dict(plan.spec.rope)
    params["rope_theta"] = rope.target_theta(params["rope_theta"], plan.spec.head_dim, plan.shape.qk_rope, strategy)
    if params.get("rope_type", "default") == "default":
        params = deepseek.default_rope_as_yarn(params, plan.spec.max_positions)
    elif params.get("rope_type") == "yarn":
        params.update(attention_factor=1.0, mscale=deepseek.YARN_MSCALE, mscale_all_dim=deepseek.YARN_MSCALE)

    def target(p: dict) -> tuple[torch.Tensor, dict]:
        config = deepseek.build_config(plan.spec, plan.shape, p, plan.dtype, plan.latent)
        emb = DeepseekV3RotaryEmbedding(DeepseekV3Config(**config))
        if abs(emb.attention_scaling - 1.0) > 1e-12:
            raise AssertionError("output rope must not rescale attention")
        return emb.inv_freq.double(), config

    kept = src.inv_freq.double()[rope.kept_frequencies(plan.spec.head_dim // 2, plan.shape.qk_rope // 2, strategy)]
    if params.get("rope_type") == "llama3" and llama3_rope == "yarn":
        params, _ = rope.llama3_as_yarn(params, kept, lambda p: target(p)[0], deepseek.LLAMACPP_YARN_BETAS,
                                        deepseek.YARN_MSCALE)
    tgt, config = target(params)
    err = ((tgt - kept).abs() / kept).max().item()
    return Candidate(strategy, src.inv_freq.double(), float(src.attention_scaling), tgt, config, err)
