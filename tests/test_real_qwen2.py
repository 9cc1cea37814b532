"""The rope step on a real Qwen2: Qwen2.5-Coder-1.5B-Instruct (28 layers, 12 query and 2 kv heads of
128, q/k/v biases, rope theta 1e6), opt-in: it runs when `python scripts/fetch_qwen_coder.py` has
put the model in its cache folder (or MLAKIT_QWEN_CODER names one), and skips otherwise.

Its first two layers carry k biases thousands of times the energy of the rest of the key, almost
all on frequencies that barely rotate; absorbed whole into the shared rotary key they made the
rope step's attention error 1.24 and 0.62 on Python code (docs/real-models.md). Teacher-forced,
calibrated on the bundled docstrings, measured on a standard-library module's code, with the full
latent so that only the rope step loses. 8192 calibration tokens (a quarter of the default): at
4096 the first layer's error is 1.07, as its inputs are token embeddings and the biases'
absorption fits only the tokens the calibration text has.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from mlakit.convert.attention import convert_attention, unpadded
from mlakit.convert.candidates import candidate
from mlakit.convert.factorize import SecondMoment
from mlakit.convert.plan import ConvertOptions
from mlakit.core import deepseek
from mlakit.core.checkpoint import CheckpointReader
from mlakit.core.families import load_spec, read_layer
from mlakit.core.forward import (
    attend,
    attention_distance_histogram,
    linear,
    mla_heads,
    mlp,
    rms_norm,
    rope_tables,
    source_qkv,
)
from mlakit.core.text import load_corpus, token_windows

QWEN = Path(os.environ.get("MLAKIT_QWEN_CODER", Path.home() / ".cache" / "mlakit" / "Qwen2.5-Coder-1.5B-Instruct"))
pytestmark = pytest.mark.skipif(not (QWEN / "config.json").is_file(),
                                reason="Qwen2.5-Coder not fetched (python scripts/fetch_qwen_coder.py)")


@torch.no_grad()
def test_rope_step_keeps_the_first_layers_of_a_real_qwen2() -> None:
    opts = ConvertOptions(kv_lora_rank=2 * 2 * 128 - 64, rope_dim=64, rope_strategy="fold", calib_tokens=8192,
                          dtype="fp32")
    spec, reader = load_spec(QWEN), CheckpointReader(QWEN)
    qk_nope, v_head = deepseek.head_dims(spec.head_dim)
    shape = deepseek.MLAShape(spec.hidden, spec.heads, qk_nope, opts.rope_dim, v_head, opts.kv_lora_rank)
    # make_plan would also time matmuls for its estimate; candidate() reads only these fields
    cand = candidate(SimpleNamespace(spec=spec, shape=shape, dtype=torch.float32, latent="exact"), "fold",
                     opts.llama3_rope)
    tokenizer = AutoTokenizer.from_pretrained(QWEN)
    calib = token_windows(tokenizer, load_corpus(None).text, opts.calib_tokens, opts.calib_seq_len, spread=True)
    code = token_windows(tokenizer, Path(inspect.__file__).read_text(encoding="utf-8"), 1024, 256,
                         what="evaluation")
    embed = reader.get("model.embed_tokens.weight")
    hidden = [embed[calib].float(), embed[code].float()]
    cos, sin = rope_tables(cand.src_freq, opts.calib_seq_len)
    tcos, tsin = rope_tables(cand.tgt_freq, opts.calib_seq_len)
    errors = []
    for i in range(2):
        layer = read_layer(spec, reader, i)
        x, x_eval = (rms_norm(h, layer.input_norm, spec.rms_eps) for h in hidden)
        stats = SecondMoment(spec.hidden)
        stats.update(x)
        q, k, _ = source_qkv(x, layer, spec, cos, sin)
        dist = attention_distance_histogram(q, k, spec)
        w = unpadded(convert_attention(layer, spec, shape, stats, dist, cand, opts)[0], spec, shape)
        ref = attend(*source_qkv(x_eval, layer, spec, cos, sin), layer, spec)
        got = linear(mla_heads(x_eval, w, spec.heads, spec.head_dim, shape.qk_rope, spec.head_dim, tcos, tsin,
                               norm_eps=None, scale=shape.qk_head**-0.5), w.o)
        errors.append(((got - ref).norm() / ref.norm()).item())
        for j, h in enumerate(hidden):
            y = h + attend(*source_qkv(rms_norm(h, layer.input_norm, spec.rms_eps), layer, spec, cos, sin), layer,
                           spec)
            hidden[j] = y + mlp(rms_norm(y, layer.post_norm, spec.rms_eps), layer.gate, layer.up, layer.down)
    assert max(errors) < 0.35, errors
