"""The output contract: a dense DeepSeek-V3 checkpoint that stock transformers, vLLM, SGLang, llama.cpp
and MLX load.

Config fields, weight names and shapes, head-dim choices, how each engine reads the rope, and the
dtypes each latent format holds in. The encodings of the latent (exact and native) are in
latent.py; the shapes each engine takes are in engines.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

try:  # transformers >= 5.25 keeps YaRN's magnitude helpers with the other rope code
    from transformers.modeling_rope_utils import yarn_apply_mscale, yarn_get_mscale
except ImportError:  # before, in the DeepSeek-V3 model file
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale, yarn_get_mscale

from mlakit.core.families import SourceSpec

# transformers builds kv_a_layernorm with a fixed eps 1e-6; vLLM, SGLang and llama.cpp use rms_norm_eps. The
# exact format needs every engine to agree on the latent norm's eps, so its rms_norm_eps is this value
# (`output_eps`), for every norm.
LATENT_NORM_EPS = 1e-6
# Dtypes the latent-norm trick holds in: fp16 flushes the scaled latent into subnormals.
LATENT_TRICK_DTYPES = {"bfloat16", "float32"}
# llama.cpp's converter (convert_hf_to_gguf.py) merges this config block into the top level before it
# writes GGUF metadata (its "lm_config" -> "text_config" rename); transformers, vLLM and SGLang do not
# read the key. It carries the values only llama.cpp may see: q_lora_rank 0, because its deepseek2
# loader requires the key (unless the model has 26 or 27 layers) and builds a plain wq for 0, while
# transformers and vLLM need null for a plain q_proj; n_group and topk_group 0, because the loader
# asserts expert_group_count < expert_count (n_routed_experts is 1 here).
LLAMACPP_BLOCK = "lm_config"
LLAMACPP_VALUES = {"q_lora_rank": 0, "n_group": 0, "topk_group": 0}
# YaRN ramp boundaries llama.cpp's deepseek2 always uses: it ignores the config's beta_fast/beta_slow.
LLAMACPP_YARN_BETAS = (32.0, 1.0)
# mscale and mscale_all_dim of an output YaRN. llama.cpp applies YaRN's magnitude 1 + 0.1 ln(factor)
# when mscale_all_dim is 0 and cancels it otherwise; this is nonzero for that, and small enough that
# every engine's 1 + 0.1 * mscale * ln(factor) is 1 in float32.
YARN_MSCALE = 1e-8
# The native format keeps every weight at a normal scale: fp16 holds it too.
NATIVE_DTYPES = {"bfloat16", "float16", "float32"}
# vLLM 0.32's CPU rotary op (_C.rotary_embedding, through RotaryEmbedding.forward_cpu) rotates a 3-D query
# of more than one head wrongly, and MLA hands it one; every scaled rope takes a PyTorch path instead.
VLLM_CPU_DEFAULT_ROPE = (
    "default rope on the CPU goes through _C.rotary_embedding, which mis-rotates the 3-D query MLA hands it "
    "(vllm/model_executor/layers/rotary_embedding/base.py:298 forward_cpu, called from "
    "vllm/model_executor/layers/mla.py:228; benchmarks/bench_engines.py reproduces it); YaRN with factor 1 is the "
    "same rope through DeepseekScalingRotaryEmbedding.forward_native (deepseek_v2.py:1115)")
# Weights of a dense decoder layer besides attention, and those outside the layers.
DENSE_LAYER_WEIGHTS = ("input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODEL_WEIGHTS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class MLAShape:
    """Attention shape of the converted model."""

    hidden: int
    heads: int
    qk_nope: int
    qk_rope: int
    v_head: int
    kv_lora_rank: int

    @property
    def qk_head(self) -> int:
        return self.qk_nope + self.qk_rope

    def kv_elements_per_token_layer(self) -> int:
        return self.kv_lora_rank + self.qk_rope

    def as_dict(self) -> dict:
        return asdict(self)


def head_dims(source_head_dim: int) -> tuple[int, int]:
    """(qk_nope, v_head) for a source head dim: the nope key holds one full source head, padded
    up to a size in vLLM's Hopper prefill set (engines.VLLM_PREFILL_HEAD_DIMS) where that is possible."""
    if source_head_dim == 64:
        return 64, 128
    if source_head_dim <= 128:
        return 128, 128
    return source_head_dim, source_head_dim


def output_eps(spec: SourceSpec, latent: str) -> float:
    """rms_norm_eps of the output. The exact format's latent norm is a constant scale only while every
    engine divides by sqrt(1e-6) (LATENT_NORM_EPS), which makes every other norm use 1e-6 too (what that
    costs a source trained with another eps: docs/quantization.md). The native format's latent is at a
    normal scale, where the latent norm's eps is immaterial, so it keeps the source's eps."""
    return LATENT_NORM_EPS if latent == "exact" else spec.rms_eps


def build_config(spec: SourceSpec, shape: MLAShape, rope: dict, torch_dtype: torch.dtype,
                 latent: str = "exact") -> dict:
    """config.json of the converted model (dense DeepSeek-V3, plain q_proj, untied lm_head) in a latent
    format, with the block of values that only llama.cpp's converter reads."""
    src = spec.hf_config
    rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    dtype = str(torch_dtype).removeprefix("torch.")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "moe_intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "first_k_dense_replace": spec.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        LLAMACPP_BLOCK: dict(LLAMACPP_VALUES),
        "routed_scaling_factor": 1.0,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": None,
        "kv_lora_rank": shape.kv_lora_rank,
        "qk_nope_head_dim": shape.qk_nope,
        "qk_rope_head_dim": shape.qk_rope,
        "v_head_dim": shape.v_head,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": output_eps(spec, latent),
        "rope_interleave": True,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": rope_scaling if rope_scaling.get("rope_type", "default") != "default" else None,
        "rope_parameters": rope,
        "tie_word_embeddings": False,
        "bos_token_id": src.bos_token_id,
        "eos_token_id": src.eos_token_id,
        "pad_token_id": getattr(src, "pad_token_id", None),
        "initializer_range": getattr(src, "initializer_range", 0.02),
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def default_rope_as_yarn(params: dict, max_positions: int) -> dict:
    """The default rope written as YaRN with factor 1: the same frequencies and no rescaling in every
    engine (a factor of 1 leaves no ramp and every YaRN magnitude at 1), but read by vLLM through its
    PyTorch rotary path, which its CPU backend computes right for MLA (VLLM_CPU_DEFAULT_ROPE). The
    original length is the source's, the length vLLM builds its rotary table for."""
    return {**params, "rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": max_positions,
            "beta_fast": LLAMACPP_YARN_BETAS[0], "beta_slow": LLAMACPP_YARN_BETAS[1], "attention_factor": 1.0,
            "mscale": YARN_MSCALE, "mscale_all_dim": YARN_MSCALE}


def attention_names(i: int) -> dict[str, str]:
    """Output weight names of layer i's attention."""
    p = f"model.layers.{i}.self_attn."
    return {
        "q_proj": p + "q_proj.weight",
        "kv_a_proj_with_mqa": p + "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm": p + "kv_a_layernorm.weight",
        "kv_b_proj": p + "kv_b_proj.weight",
        "o_proj": p + "o_proj.weight",
    }


def effective_config(raw: dict) -> dict:
    """config.json with transformers' DeepSeek-V3 defaults filled in, as every engine reads it."""
    return {**DeepseekV3Config().to_dict(), **raw}


def mla_shape(cfg: dict) -> MLAShape:
    """The attention shape an (effective) DeepSeek-V3 config describes."""
    return MLAShape(cfg["hidden_size"], cfg["num_attention_heads"], cfg["qk_nope_head_dim"],
                    cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"])


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a dense DeepSeek-V3 with a plain q_proj and an untied lm_head, with its shape."""
    s = mla_shape(cfg)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = dict(zip(MODEL_WEIGHTS, [(vocab, hidden), (hidden,), (vocab, hidden)]))
    layer = dict(zip(DENSE_LAYER_WEIGHTS, [(hidden,), (hidden,), (inter, hidden), (inter, hidden), (hidden, inter)]))
    for i in range(cfg["num_hidden_layers"]):
        names = attention_names(i)
        shapes[names["q_proj"]] = (s.heads * s.qk_head, hidden)
        shapes[names["kv_a_proj_with_mqa"]] = (s.kv_lora_rank + s.qk_rope, hidden)
        shapes[names["kv_a_layernorm"]] = (s.kv_lora_rank,)
        shapes[names["kv_b_proj"]] = (s.heads * (s.qk_nope + s.v_head), s.kv_lora_rank)
        shapes[names["o_proj"]] = (hidden, s.heads * s.v_head)
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    return shapes


@dataclass(frozen=True)
class EngineRope:
    """What one engine computes from a config's rope fields: how it reads them, its inverse
    frequencies (None where it refuses them), and its factors on the rotary q and k and on every
    attention logit (on top of 1/sqrt(qk_head_dim))."""

    reads: str
    inv_freq: torch.Tensor | None
    rotary_scale: float = 1.0
    logit_scale: float = 1.0

    @property
    def rotary_logit_scale(self) -> float:
        return self.logit_scale * self.rotary_scale**2


def engine_rope(cfg: dict) -> dict[str, EngineRope]:
    """How transformers, vLLM (GPU and CPU), SGLang, llama.cpp and MLX read the rope of a DeepSeek-V3 config.

    transformers computes every type as written. vLLM and SGLang turn every scaling type into
    DeepSeek YaRN (beta_fast/beta_slow as written, cos/sin times mscale(mscale) / mscale(mscale_all_dim),
    logits times mscale(mscale_all_dim)^2); vLLM's CPU path computes the default rope wrongly for MLA
    (VLLM_CPU_DEFAULT_ROPE). MLX: `_mlx_rope`. llama.cpp's deepseek2 reads YaRN with beta 32/1 whatever the
    config says; with mscale_all_dim 0 or absent it keeps YaRN's magnitude 1 + 0.1 ln(factor) on the
    rotary q and k and applies its square to every logit, else only mscale(mscale_all_dim)^2 on the
    logits; linear gets the plain frequencies over factor and the same squared magnitude on the
    logits; other types are not read."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope["rope_theta"]
    base = {k: v for k, v in cfg.items() if k != "rope_scaling"}

    def rotary(params: dict) -> tuple[torch.Tensor | None, float]:
        """transformers' frequencies and cos/sin factor for these parameters; None where it cannot."""
        try:
            emb = DeepseekV3RotaryEmbedding(DeepseekV3Config(**{**base, "rope_parameters": params}))
        except Exception:  # transformers' strict config and rope init raise several types
            return None, 1.0
        return emb.inv_freq.double(), float(emb.attention_scaling)

    plain = rotary({"rope_type": "default", "rope_theta": theta})[0]
    factor, orig = rope.get("factor"), rope.get("original_max_position_embeddings")
    out = {"transformers": EngineRope(f"{kind} as written", *rotary(rope), yarn_apply_mscale(rope, 1.0))}
    if kind == "default":
        served = EngineRope("no scaling", plain)
    elif factor is None or orig is None:
        served = EngineRope(f"{kind} read as YaRN, which needs factor and original_max_position_embeddings", None)
    else:
        betas = (rope.get("beta_fast", 32.0), rope.get("beta_slow", 1.0))
        all_dim = rope.get("mscale_all_dim") or 0.0
        yarn = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": orig,
                "beta_fast": betas[0], "beta_slow": betas[1], "attention_factor": 1.0}
        served = EngineRope(
            f"{'YaRN' if kind == 'yarn' else kind + ' read as YaRN'} with beta {betas[0]:g}/{betas[1]:g}",
            rotary(yarn)[0],
            yarn_get_mscale(factor, rope.get("mscale", 1.0)) / yarn_get_mscale(factor, all_dim)
            * rope.get("attn_factor", 1.0),
            yarn_get_mscale(factor, all_dim) ** 2,
        )
    out["vllm"] = out["sglang"] = served
    out["vllm-cpu"] = served if kind != "default" else EngineRope(VLLM_CPU_DEFAULT_ROPE, None)
    magnitude = yarn_get_mscale(factor or 1.0)
    if kind == "yarn":
        log_mul = rope.get("mscale_all_dim") or 0.0
        fixed = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": orig,
                 "beta_fast": LLAMACPP_YARN_BETAS[0], "beta_slow": LLAMACPP_YARN_BETAS[1], "attention_factor": 1.0}
        out["llamacpp"] = EngineRope(
            f"YaRN with beta {LLAMACPP_YARN_BETAS[0]:g}/{LLAMACPP_YARN_BETAS[1]:g} (fixed)", rotary(fixed)[0],
            1.0 if log_mul else magnitude, yarn_get_mscale(factor, log_mul) ** 2 if log_mul else magnitude**2)
    elif kind == "linear":
        out["llamacpp"] = EngineRope("linear, with YaRN's attention magnitude", plain / factor, 1.0, magnitude**2)
    else:
        out["llamacpp"] = EngineRope("no scaling" if kind == "default" else f"{kind} not read: no scaling", plain)
    out["mlx"] = _mlx_rope(cfg.get("rope_scaling") or {}, theta, plain, rotary)
    return out


def _mlx_rope(scaling: dict, theta: float, plain: torch.Tensor,
              rotary: Callable[[dict], tuple[torch.Tensor | None, float]]) -> EngineRope:
    """What mlx-lm 0.32.2 computes: it reads `rope_scaling` (not `rope_parameters`) through
    mlx_lm/models/rope_utils.py initialize_rope (:305 default and linear, :318 llama3, :326 YaRN with
    beta_fast/beta_slow as written and cos/sin times mscale(mscale) / mscale(mscale_all_dim)), and
    multiplies the softmax scale by mscale(mscale_all_dim)^2 when mscale_all_dim is set
    (mlx_lm/models/deepseek_v3.py:101-107)."""
    kind = scaling.get("type") or scaling.get("rope_type", "default")
    factor = scaling.get("factor", 1.0)
    if kind in ("default", "linear"):
        return EngineRope(f"{kind} (rope_scaling)", plain / (factor if kind == "linear" else 1.0))
    if kind == "llama3":
        return EngineRope("llama3 as written (rope_scaling)", rotary({**scaling, "rope_theta": theta})[0])
    if kind not in ("yarn", "deepseek_yarn"):
        return EngineRope(f"{kind} (rope_scaling): not compared", None)
    betas = (scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0))
    all_dim = scaling.get("mscale_all_dim", 0.0)
    yarn = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "beta_fast": betas[0], "beta_slow": betas[1],
            "original_max_position_embeddings": scaling.get("original_max_position_embeddings", 4096),
            "attention_factor": 1.0}
    return EngineRope(f"YaRN with beta {betas[0]:g}/{betas[1]:g} (rope_scaling)", rotary(yarn)[0],
                      yarn_get_mscale(factor, scaling.get("mscale", 1.0)) / yarn_get_mscale(factor, all_dim),
                      yarn_get_mscale(factor, all_dim) ** 2 if all_dim else 1.0)
