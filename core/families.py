"""Source model families (Llama, Mistral, Qwen2): what their configs and weights look like.

The three families share one decoder layout; they differ only in biases and sliding windows, so
each is a row of data. Anything else is refused with the reason, before any output is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from mlakit.core.checkpoint import CheckpointReader, read_json
from mlakit.core.errors import MlakitError

# model_type -> whether q/k/v carry biases by design
FAMILIES = {"llama": False, "mistral": False, "qwen2": True}

REFUSED = {
    "qwen3": "Qwen3 normalizes q and k per head (q_norm/k_norm), which MLA cannot express",
    "qwen3_moe": "Qwen3-MoE has q/k norms and experts",
    "gemma": "Gemma scales embeddings and uses GeGLU and (1 + w) norms",
    "gemma2": "Gemma 2 uses soft-capping and sliding windows",
    "gemma3": "Gemma 3 has q/k norms and sliding windows",
    "mixtral": "Mixtral is a mixture of experts",
    "qwen2_moe": "Qwen2-MoE is a mixture of experts",
    "phi3": "Phi-3 fuses qkv and may use partial rotary",
    "olmo2": "OLMo 2 has q/k norms",
    "deepseek_v3": "this is already an MLA model",
    "deepseek_v2": "this is already an MLA model",
}

# config.json fields every weight's shape depends on: transformers fills a missing one with its class
# default (hidden_size 4096 for Llama), which need not be this model's, so they must be written out.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

LAYER_WEIGHTS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class SourceSpec:
    """Everything the conversion needs to know about the source, read once from config.json."""

    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    intermediate: int
    vocab: int
    rms_eps: float
    max_positions: int
    tied: bool
    qkv_bias: bool
    hf_config: PretrainedConfig

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def rope(self) -> dict:
        return dict(self.hf_config.rope_parameters)

    def kv_elements_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim


def load_spec(folder: Path) -> SourceSpec:
    """Read and check the source config; refuse what cannot be converted, naming the reason."""
    raw = read_json(folder / "config.json")
    mtype = raw.get("model_type", "?")
    if mtype in REFUSED:
        raise MlakitError(f"unsupported model_type {mtype}: {REFUSED[mtype]}")
    if mtype not in FAMILIES:
        raise MlakitError(f"unsupported model_type {mtype}: mlakit converts {', '.join(sorted(FAMILIES))}")
    missing = [key for key in SHAPE_FIELDS if key not in raw]
    if missing:
        raise MlakitError(f"{folder / 'config.json'}: no {', '.join(missing)}; every weight's shape depends on it, "
                          "and transformers would assume a default that need not be this model's")
    try:
        cfg = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # strict configs raise several types
        raise MlakitError(f"{folder / 'config.json'}: transformers cannot read it ({exc})") from exc
    if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
        raise MlakitError(f"unsupported {mtype} variant: mixture of experts")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise MlakitError(f"unsupported hidden_act {cfg.hidden_act}: DeepSeek-V3 MLPs use silu")
    if getattr(cfg, "attention_bias", False):
        raise MlakitError("unsupported attention_bias: the o_proj bias cannot be expressed (DeepSeek-V3 has no biases)")
    if getattr(cfg, "mlp_bias", False):
        raise MlakitError("unsupported mlp_bias: DeepSeek-V3 MLPs have no biases")
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", True)
    if window is not None and uses_window and window < cfg.max_position_embeddings:
        raise MlakitError(
            f"unsupported sliding_window {window} < max_position_embeddings {cfg.max_position_embeddings}: "
            "DeepSeek-V3 attends to the full context"
        )
    rope = cfg.rope_parameters or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise MlakitError(f"unsupported rope_type {rope_type}: mlakit carries default, linear, llama3 and yarn")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise MlakitError("unsupported partial_rotary_factor: every source dim must be rotary")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    if cfg.num_attention_heads % kv_heads:
        raise MlakitError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of kv heads {kv_heads}")
    return SourceSpec(
        model_type=mtype,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        layers=cfg.num_hidden_layers,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        rms_eps=cfg.rms_norm_eps,
        max_positions=cfg.max_position_embeddings,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=FAMILIES[mtype],
        hf_config=cfg,
    )


def layer_name(i: int, key: str, kind: str = "weight") -> str:
    return f"model.layers.{i}.{LAYER_WEIGHTS[key]}.{kind}"


def expected_weights(spec: SourceSpec, head: bool) -> dict[str, tuple[int, ...]]:
    """Every weight the conversion reads, with the shape the config implies; `head`: an lm_head
    is stored (untied models always have one, tied ones may)."""
    D, I, V = spec.hidden, spec.intermediate, spec.vocab
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    layer = {"q": (q, D), "k": (kv, D), "v": (kv, D), "o": (D, q), "gate": (I, D), "up": (I, D), "down": (D, I),
             "input_norm": (D,), "post_norm": (D,)}
    biases = {"q": (q,), "k": (kv,), "v": (kv,)} if spec.qkv_bias else {}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if head:
        shapes["lm_head.weight"] = (V, D)
    for i in range(spec.layers):
        shapes |= {layer_name(i, key): shape for key, shape in layer.items()}
        shapes |= {layer_name(i, key, "bias"): shape for key, shape in biases.items()}
    return shapes


def check_weights(spec: SourceSpec, reader: CheckpointReader) -> None:
    """Every expected weight is present with the shape the config implies, and no unknown weight
    would be silently dropped; from the shard headers alone, so that a bad checkpoint fails before
    the first layer."""
    expected = expected_weights(spec, head=not spec.tied or "lm_head.weight" in reader)
    names = set(reader.names)
    missing = sorted(expected.keys() - names)
    if missing:
        raise MlakitError(f"{reader.folder}: {len(missing)} weights missing, first {missing[0]}")
    unknown = sorted(n for n in names - expected.keys() if not n.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise MlakitError(f"{reader.folder}: unknown weight {unknown[0]} ({len(unknown)} in all); not converted")
    wrong = [(name, reader.info(name).shape, shape) for name, shape in expected.items()
             if reader.info(name).shape != shape]
    if wrong:
        name, got, want = wrong[0]
        raise MlakitError(f"{reader.folder}: {name} has shape {list(got)}, but config.json implies {list(want)}"
                          + (f" ({len(wrong)} weights mismatch)" if len(wrong) > 1 else ""))


@dataclass
class SourceLayer:
    """One decoder layer's weights, as float32 tensors in the source's own layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def to(self, device: str | torch.device) -> SourceLayer:
        return SourceLayer(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


def read_layer(spec: SourceSpec, reader: CheckpointReader, i: int) -> SourceLayer:
    def get(key: str, kind: str = "weight") -> torch.Tensor:
        return reader.get(layer_name(i, key, kind)).float()

    def bias(key: str) -> torch.Tensor | None:
        return get(key, "bias") if spec.qkv_bias else None

    return SourceLayer(
        q=get("q"), k=get("k"), v=get("v"), o=get("o"),
        q_bias=bias("q"), k_bias=bias("k"), v_bias=bias("v"),
        input_norm=get("input_norm"), post_norm=get("post_norm"),
        gate=get("gate"), up=get("up"), down=get("down"),
    )
