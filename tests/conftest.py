"""Shared fixtures: pico models built in the tests, never downloaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mlakit.core.guard import DEMO_DIR

DEMO_AVAILABLE = (DEMO_DIR / "model.safetensors").is_file()
# The conversion's devices here: the factorization's exactness is proven on each.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _sample_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Calibration text sampled from test models is cached in a folder of the test session, not
    in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLAKIT_CACHE", str(tmp_path_factory.mktemp("mlakit-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _fresh_accelerator() -> Iterator[None]:
    """accelerate keeps one mixed-precision setting per process (a user's run distills once); tests
    distill many times, with `--precision` set or chosen by the machine, so each test ends with a
    fresh one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (256 tokens), enough to feed text to pico models."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def make_llama(folder: Path, *, heads=4, kv_heads=2, head_dim=16, hidden=64, layers=2, vocab=256,
               model_type="llama", tied=True, rope_parameters=None, seed=0, shards=False, rms_norm_eps=1e-6) -> Path:
    """Save a randomly initialized pico source model (fp32) of a family, with a tokenizer."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=2 * hidden, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=tied, rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=rms_norm_eps)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(folder, max_shard_size="100KB" if shards else "5GB")
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def pico(tmp_path: Path) -> Path:
    return make_llama(tmp_path / "pico")
