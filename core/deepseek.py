"""The output contract: a dense DeepSeek-V3 checkpoint that stock transformers, vLLM, SGLang, llama.cpp
and MLX load.

Config fields, weight names, head-dim choices, how each engine reads the rope, and the two latent
formats: the exact one, whose trick makes the latent RMSNorm a fixed per-channel scale, and the
native one, whose latent stays at a normal scale that quantization keeps (docs/quantization.md).
The shapes each engine takes are in engines.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3RotaryEmbedding,
    yarn_apply_mscale,
    yarn_get_mscale,
)

from mlakit.core.families import SourceSpec
from mlakit.core.forward import MLAWeights

# transformers builds kv_a_layernorm with a fixed eps 1e-6; vLLM, SGLang and llama.cpp use rms_norm_eps. The
# exact format needs every engine to agree on the latent norm's eps, so its rms_norm_eps is this value
# (`output_eps`), for every norm.
LATENT_NORM_EPS = 1e-6
# The latent's mean square stays below this fraction of eps, so RMSNorm(c) = c / sqrt(eps) to 5e-7.
LATENT_NORM_MARGIN = 1e-6
# Ridge of the native format's least-squares refit, relative to the mean of the Gram diagonal.
NATIVE_RIDGE = 1e-6
# L-BFGS iterations and eigenvalue spread of the native format's latent metric.
NATIVE_METRIC_STEPS = 100
NATIVE_METRIC_CONDITION = 30.0
# Calibration latents per layer the native format's latent metric is fitted on (a random subset).
NATIVE_METRIC_TOKENS = 16384
# Worst-case mean square of a latent, as a fraction of eps, below which the latent norm is taken as linear.
LINEAR_REGIME = 1e-2
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


def latent_norm_trick(latent: torch.Tensor, input_gamma: torch.Tensor, hidden: int,
                      eps: float = LATENT_NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale the latent rows so that kv_a_layernorm acts as the constant scale 1/sqrt(eps).

    The layer input is gamma * n with ||n|| <= sqrt(hidden), so ||latent @ x|| is bounded by
    sqrt(hidden) * ||latent diag(gamma)||_2; alpha keeps mean(c^2) <= margin * eps for every input.
    Returns the scaled rows and the norm weight sqrt(eps) / alpha that undoes the scale, a power of two.
    """
    rank = latent.shape[0]
    bound = torch.linalg.matrix_norm(latent.double() * input_gamma.double().to(latent.device), ord=2).item()
    bound *= math.sqrt(hidden)
    largest = math.sqrt(LATENT_NORM_MARGIN * eps * rank) / max(bound, 1e-30)
    # the norm weight is rounded up to a power of two, exact in bf16 (rounding it would scale every key
    # and value of the layer by up to 0.4%); alpha only shrinks, so the bound still holds
    weight = 2.0 ** math.ceil(math.log2(math.sqrt(eps) / largest))
    alpha = math.sqrt(eps) / weight
    return latent * alpha, torch.full((rank,), weight, dtype=latent.dtype, device=latent.device)


def plain_latent(scaled: torch.Tensor, norm_weight: torch.Tensor, eps: float = LATENT_NORM_EPS) -> torch.Tensor:
    """Undo `latent_norm_trick`: the plain latent rows that training works on."""
    return scaled * (norm_weight / math.sqrt(eps)).unsqueeze(1)


class LatentMoments:
    """Calibration statistics of one layer's plain latent c, for `native_attention`'s refit.

    In the native format kv_a_layernorm really normalizes: kv_b_proj sees n = w * RMSNorm(T c),
    with T the latent's transform and w the norm's weight (`native_transform`), instead of c. Since
    every row of kv_b_proj is regressed on the same n, the least-squares
    kv_b' = argmin sum_t ||kv_b' n_t - kv_b c_t||^2 is kv_b C for one rank x rank
    C = (sum c n^T)(sum n n^T)^-1, whatever weight each output row gets; these sums are all it needs.
    """

    def __init__(self, transform: torch.Tensor, weight: torch.Tensor):
        self.transform, self.weight = transform.double(), weight.double().to(transform.device)
        rank, device = transform.shape[0], transform.device
        self.cn = torch.zeros(rank, rank, dtype=torch.float64, device=device)
        self.nn = torch.zeros(rank, rank, dtype=torch.float64, device=device)

    def update(self, c: torch.Tensor) -> None:
        """Add plain latents c (..., rank)."""
        c = c.reshape(-1, c.shape[-1]).double()
        n = normalized_latent(c @ self.transform.T) * self.weight
        self.cn += c.T @ n
        self.nn += n.T @ n

    def refit(self) -> torch.Tensor:
        """C: kv_b C maps normalized latents to what kv_b makes of the plain ones."""
        ridge = NATIVE_RIDGE * self.nn.diagonal().mean().clamp_min(1e-30)
        eye = torch.eye(self.nn.shape[0], dtype=self.nn.dtype, device=self.nn.device)
        return torch.linalg.solve(self.nn + ridge * eye, self.cn.T).T


def normalized_latent(c: torch.Tensor, eps: float = LATENT_NORM_EPS) -> torch.Tensor:
    """kv_a_layernorm without its weight, in float64."""
    c = c.double()
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)


def latent_metric(c: torch.Tensor, steps: int = NATIVE_METRIC_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, V): the metric M = V diag(s^2) V^T that makes ||diag(s) V^T c|| as constant as it can
    over calibration latents c, s at most 1.

    The norm's output is a fixed linear map of c exactly when the rms of what it normalizes is
    constant; the plain latent's rms varies by 10-30% over real text, and an ellipsoidal metric
    flattens it (L-BFGS on the relative variance of c^T M c). Returned in its eigenbasis so that
    each latent row gets one scale s_k of its own (mixing scales inside a row or a kv_b_proj column
    would let quantization noise of the large ones swamp the small ones); s is kept within
    NATIVE_METRIC_CONDITION of its largest value."""
    c = c.reshape(-1, c.shape[-1]).double()
    if steps == 0:
        return (torch.ones(c.shape[1], dtype=c.dtype, device=c.device),
                torch.eye(c.shape[1], dtype=c.dtype, device=c.device))
    c = c / c.pow(2).mean().sqrt().clamp_min(1e-30)
    root = torch.eye(c.shape[1], dtype=c.dtype, device=c.device, requires_grad=True)
    opt = torch.optim.LBFGS([root], max_iter=steps, line_search_fn="strong_wolfe")

    def relative_variance() -> torch.Tensor:
        opt.zero_grad()
        q = (c @ root.T).pow(2).sum(-1)
        loss = q.var() / q.mean().pow(2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(relative_variance)
    s, v = torch.linalg.eigh(root.detach().T @ root.detach())
    s = s.clamp_min(0).sqrt()
    s = s.clamp_min(s.max() / NATIVE_METRIC_CONDITION)
    return s / s.max(), v


def native_transform(kv_a: torch.Tensor, rank: int, sample: torch.Tensor,
                     steps: int = NATIVE_METRIC_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha diag(s) V^T, 1 / s): the latent's transform from `latent_metric` fitted on a sample of
    plain latents, scaled so that the native latent rows have the rms of the rope rows beside them
    (one scale per tensor or per block then fits both; the norm makes the scale free), and the
    kv_a_layernorm weight that gives each row its own scale back after the norm, where no
    quantizer sees it."""
    s, v = (t.to(kv_a.device) for t in latent_metric(sample, steps))
    t = s[:, None] * v.T
    latent = t @ kv_a[:rank].double()
    rope_rms = kv_a[rank:].double().pow(2).mean().sqrt()
    return t * (rope_rms / latent.pow(2).mean().sqrt().clamp_min(1e-30)), 1 / s


def native_attention(w: MLAWeights, moments: LatentMoments) -> MLAWeights:
    """Plain weights (kv_a_layernorm as identity) in the native latent format: latent rows
    transform @ L and kv_a_layernorm = weight * g (`native_transform`), kv_b_proj = kv_b C / g
    (`LatentMoments`), with g the rms of C's entries times sqrt(rank), so that kv_b_proj keeps its
    plain scale. Approximate: exact only when the transformed latent's rms is constant over inputs."""
    rank = w.kv_b.shape[1]
    dev = w.kv_b.device
    c = moments.refit().to(dev)
    g = c.pow(2).mean().sqrt().item() * math.sqrt(rank)
    kv_b = w.kv_b.double() @ c / g
    latent = moments.transform.to(dev) @ w.kv_a[:rank].double()
    return MLAWeights(w.q, torch.cat([latent.float(), w.kv_a[rank:]]), (moments.weight.to(dev) * g).float(),
                      kv_b.float(), w.o)


def latent_is_linear(kv_a_latent: torch.Tensor, input_gamma: torch.Tensor, hidden: int) -> bool:
    """Whether stored latent rows are in `latent_norm_trick`'s linear regime (the exact format) rather
    than the native one: the worst-case mean square stays far below eps. The two regimes are many
    orders of magnitude apart, so a loose threshold separates them in any dtype."""
    rank = kv_a_latent.shape[0]
    bound = torch.linalg.matrix_norm(kv_a_latent.double() * input_gamma.double().to(kv_a_latent.device),
                                     ord=2).item() * math.sqrt(hidden)
    return bound**2 / rank <= LINEAR_REGIME * LATENT_NORM_EPS


def format_attention(i: int, w: MLAWeights, input_gamma: torch.Tensor, hidden: int,
                     native: bool = False) -> dict[str, torch.Tensor]:
    """Layer i's attention tensors in the output format. Exact format: from plain weights, trick
    applied. Native format (`native`): `w` is already native (see `native_attention`), written as is."""
    rank = w.kv_b.shape[1]
    names = attention_names(i)
    if native:
        kv_a, norm = w.kv_a.float(), w.kv_norm.float()
    else:
        latent, scale = latent_norm_trick(w.kv_a[:rank].double(), input_gamma.double(), hidden)
        kv_a = torch.cat([latent.float(), w.kv_a[rank:].float()])
        norm = scale.float() * w.kv_norm.float().to(scale.device)
    return {
        names["q_proj"]: w.q,
        names["kv_a_proj_with_mqa"]: kv_a,
        names["kv_a_layernorm"]: norm,
        names["kv_b_proj"]: w.kv_b,
        names["o_proj"]: w.o,
    }


def pad_latent(tensors: dict[str, torch.Tensor], i: int, rank: int) -> dict[str, torch.Tensor]:
    """Layer i's stored attention tensors with the latent zero-padded to `rank`: zero latent rows in
    kv_a_proj_with_mqa (before the rope rows), zero kv_a_layernorm weights and zero kv_b_proj columns,
    so that an engine that takes only certain latent widths serves a latent the source fills less.

    A zero latent dim adds nothing to any key or value. The exact format's norm stays linear (padding
    only lowers the mean square): bit-exact. The native format's norm averages over `rank` dims instead
    of the `filled` ones, which scales its output by sqrt(rank / filled); the norm weights of the real
    dims are scaled down by as much (rounded once to the stored dtype). What is left is eps's share,
    a relative (rank / filled - 1) * eps / (2 * mean square of the latent): below float32's precision
    for a native latent, whose rows have the rope rows' scale."""
    names = attention_names(i)
    kv_a, norm, kv_b = (tensors[names[k]] for k in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"))
    filled = kv_b.shape[1]
    if rank < filled:
        raise ValueError(f"cannot pad a latent of {filled} to {rank}")
    gamma = tensors[f"model.layers.{i}.input_layernorm.weight"]
    linear = latent_is_linear(kv_a[:filled].float(), gamma.float(), gamma.shape[0])
    scale = 1.0 if linear else math.sqrt(filled / rank)
    extra = rank - filled
    return {
        **tensors,
        names["kv_a_proj_with_mqa"]: torch.cat([kv_a[:filled], kv_a.new_zeros(extra, kv_a.shape[1]), kv_a[filled:]]),
        names["kv_a_layernorm"]: torch.cat([(norm.double() * scale).to(norm.dtype), norm.new_zeros(extra)]),
        names["kv_b_proj"]: torch.cat([kv_b, kv_b.new_zeros(kv_b.shape[0], extra)], dim=1),
    }


def plain_attention(get: Callable[[str], torch.Tensor], i: int, rank: int) -> MLAWeights:
    """Layer i's attention as stored (`get` reads a tensor by name), in the plain linear
    parametrization (trick undone, kv_a_layernorm as identity), float32."""
    names = attention_names(i)
    kv_a = get(names["kv_a_proj_with_mqa"]).float()
    latent = plain_latent(kv_a[:rank], get(names["kv_a_layernorm"]).float())
    return MLAWeights(
        q=get(names["q_proj"]).float(),
        kv_a=torch.cat([latent, kv_a[rank:]]),
        kv_norm=torch.ones(rank, device=kv_a.device),
        kv_b=get(names["kv_b_proj"]).float(),
        o=get(names["o_proj"]).float(),
    )


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
