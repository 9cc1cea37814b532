"""Shared fixtures: pico models built in the tests, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from mlakit.convert.checkpoint import DEMO_DIR

DEMO_AVAILABLE = (DEMO_DIR / "model.safetensors").is_file()
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (256 tokens), enough to feed text to pico models."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def make_llama(folder: Path, *, heads=4, kv_heads=2, head_dim=16, hidden=64, layers=2, vocab=256,
               model_type="llama", bias=False, tied=True, rope_parameters=None, seed=0, shards=False) -> Path:
    """Save a randomly initialized pico source model (fp32) with a tokenizer."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, intermediate_size=2 * hidden, num_hidden_layers=layers, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=tied, attention_bias=bias,
                      rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(folder, max_shard_size="100KB" if shards else "5GB")
    if model_type != "llama":
        cfg_path = folder / "config.json"
        raw = json.loads(cfg_path.read_text())
        raw["model_type"] = model_type
        raw["architectures"] = [f"{model_type.capitalize()}ForCausalLM"]
        cfg_path.write_text(json.dumps(raw))
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def pico(tmp_path: Path) -> Path:
    return make_llama(tmp_path / "pico")
