"""The student (the converted MLA model) as a reader of one decoder layer at a time, with its
functional forwards; the teacher is the layer stream's source model (`core/stream.py`).

Layer-wise calibration carries hidden states through both models the way convert does, so memory
holds one layer of each and the hidden states, whatever the depth. Every sequence function goes
through `per_document`, so packed documents never attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from mlakit.calibrate.export import load_mla_config, stored_attention
from mlakit.core.checkpoint import CheckpointReader
from mlakit.core.deepseek import LATENT_NORM_EPS, attention_names, yarn_apply_mscale
from mlakit.core.latent import latent_is_linear
from mlakit.core.families import SourceLayer, layer_name
from mlakit.core.forward import MLAWeights, mla_attention, mlp, rms_norm, rope_tables
from mlakit.core.stream import ModelEnds, per_document, same_values


@dataclass
class StudentLayer:
    """One converted decoder layer. `attn` is in the plain parametrization (`norm_eps` None) when
    stored in the exact format, and as stored, kv_a_layernorm active, in the native format."""

    attn: MLAWeights
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    norm_eps: float | None = None


class Student(ModelEnds):
    """The converted MLA model, read layer by layer."""

    def __init__(self, folder: Path, seq_len: int, device: str):
        self.config = c = load_mla_config(folder)
        super().__init__(CheckpointReader(folder), device, c.rms_norm_eps)
        self.layers = c.num_hidden_layers
        self.dims = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
        self.scale = yarn_apply_mscale(c.rope_parameters, (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5)
        rot = DeepseekV3RotaryEmbedding(c)
        self.cos, self.sin = (t.to(device) for t in rope_tables(rot.inv_freq, seq_len, rot.attention_scaling))

    def layer(self, i: int, source: SourceLayer | None = None) -> StudentLayer:
        """Layer i in float32. Its norms and MLP are `source`'s tensors (the source model's layer i) where
        the stored values are the same, as convert copies them: one copy, not two (2.6 GiB of MLP at
        Llama-3.1-70B shapes)."""
        # a dense DeepSeek-V3 layer names its norms and MLP exactly as a Llama layer does
        def get(key: str) -> torch.Tensor:
            stored = self.reader.get(layer_name(i, key))
            if source is not None and same_values(stored, getattr(source, key)):
                return getattr(source, key)
            return stored.float().to(self.device)

        rank, gamma = self.config.kv_lora_rank, get("input_norm")
        latent = self.reader.get(attention_names(i)["kv_a_proj_with_mqa"])[:rank].float().to(self.device)
        native = not latent_is_linear(latent, gamma, self.config.hidden_size)
        attn = stored_attention(self.reader.get, i, rank, native)
        return StudentLayer(MLAWeights(*(t.to(self.device) for t in vars(attn).values())),
                            gamma, get("post_norm"), get("gate"), get("up"), get("down"),
                            LATENT_NORM_EPS if native else None)

    def attention(self, x: torch.Tensor, w: MLAWeights, pos: torch.Tensor,
                  norm_eps: float | None = None) -> torch.Tensor:
        """MLA attention on normed inputs x: plain (`norm_eps` None) or with kv_a_layernorm."""
        heads, nope, rope, v = self.dims
        return per_document(
            lambda y: mla_attention(y, w, heads, nope, rope, v, self.cos, self.sin, norm_eps=norm_eps,
                                    scale=self.scale),
            x, pos,
        )

    def forward_layer(self, h: torch.Tensor, layer: StudentLayer, pos: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(rms_norm(h, layer.input_norm, self.eps), layer.attn, pos, layer.norm_eps)
        return h + mlp(rms_norm(h, layer.post_norm, self.eps), layer.gate, layer.up, layer.down)
