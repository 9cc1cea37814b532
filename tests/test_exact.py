"""Transformations that must be exact, proven to float tolerance."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICES
from transformers import DeepseekV3Config, LlamaConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from mlakit.convert import rope
from mlakit.convert.attention import padded_columns, unpadded
from mlakit.convert.factorize import joint_latent
from mlakit.core import deepseek, forward
from mlakit.core.latent import latent_norm_trick, plain_latent
from mlakit.core.families import SourceLayer, SourceSpec
from mlakit.core.forward import (
    MLAWeights,
    attention_distance_histogram,
    interleaved_rope,
    mla_attention,
    rms_norm,
    rope_tables,
    rotate_half_rope,
    source_layer,
    source_qkv,
)


@pytest.fixture(autouse=True)
def float64():
    """Exactness is checked in float64; other modules keep the float32 default."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_interleave_permutation_commutes_with_rope() -> None:
    d, n = 16, 10
    x = torch.randn(3, n, d)
    cos, sin = rope_tables(10000.0 ** (-torch.arange(0, d, 2) / d), n)
    perm = rope.interleave_permutation(d)
    lhs = rotate_half_rope(x, cos.double(), sin.double())[..., perm]
    rhs = interleaved_rope(x[..., perm], cos.double(), sin.double())
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)
    assert sorted(perm.tolist()) == list(range(d))


def _scores(q: torch.Tensor, k: torch.Tensor, freq: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Re sum_f conj(q_f e^{iwt}) k_f e^{iws} for complex per-frequency vectors."""
    return (q.conj() * k * torch.exp(-1j * freq * (t - s))).real.sum(-1)


@pytest.mark.parametrize("device", DEVICES)
def test_rorope_split_keeps_every_score_before_truncation(device: str) -> None:
    """Rotating keys across kv heads per frequency and folding the rotation into the queries
    changes no score, as long as every component keeps its rotation."""
    torch.manual_seed(0)
    H, G, F, D = 6, 3, 8, 24
    k = torch.randn(G, F, D, dtype=torch.complex128).to(device)
    q = torch.randn(H, F, D, dtype=torch.complex128).to(device)
    x = torch.randn(200, D).to(device)
    sigma = x.T @ x / 200
    freq = (10000.0 ** (-torch.arange(F) / F)).to(device)
    for complex_pca in (True, False):
        split = rope.rorope(k, q, sigma, freq, freq, rope.slot_groups(F, F, "fold"), complex_pca=complex_pca)
        xt, xs = x[0], x[1]
        group = torch.arange(H) // (H // G)
        for h in range(H):
            ref = _scores(q[h] @ xt.to(q.dtype), k[group[h]] @ xs.to(k.dtype), freq, 7, 2)
            rot = _scores(split.q_rot[h] @ xt.to(q.dtype), split.k_rot @ xs.to(k.dtype), freq, 7, 2)
            nope = _scores(split.q_nope[h] @ xt.to(q.dtype), split.k_nope[group[h]] @ xs.to(k.dtype), freq, 7, 2)
            torch.testing.assert_close(rot + nope, ref, rtol=1e-10, atol=1e-10)
        assert 0.0 < split.energy_kept <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_complex_pca_keeps_at_least_the_real_energy(device: str) -> None:
    torch.manual_seed(1)
    k = torch.randn(4, 8, 16, dtype=torch.complex128).to(device)
    x = (torch.randn(300, 16) @ torch.randn(16, 16)).to(device)
    sigma = x.T @ x / 300
    freq = torch.ones(8)
    q = torch.randn(4, 8, 16, dtype=torch.complex128).to(device)
    args = (k, q, sigma, freq, freq, rope.slot_groups(8, 8, "fold"))
    assert rope.rorope(*args, complex_pca=True).energy_kept >= rope.rorope(*args, complex_pca=False).energy_kept - 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_expected_rotation_of_a_fixed_distance(device: str) -> None:
    """On the histogram's device, from frequencies on the host (as the conversion has them)."""
    dist = torch.zeros(2, 10, device=device)
    dist[0, 3] = 5.0
    dist[1, 0] = 1.0
    freq = torch.tensor([0.1, 1.0])
    e = rope.expected_rotation(dist, freq)
    torch.testing.assert_close(e[0], torch.exp(-1j * freq.double() * 3).to(device))
    torch.testing.assert_close(e[1], torch.ones(2, dtype=torch.complex128, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy,slots", [("fold", 4), ("even", 4), ("high", 2), ("fold2", 4)])
def test_expected_rotation_is_exact_when_every_head_attends_at_one_distance(strategy: str, slots: int,
                                                                             device: str) -> None:
    """With a distance histogram that is one-hot at delta for every head, E[R(delta)] is R(delta) itself:
    a query-key pair at that distance gets the source's score to float precision, although fewer
    slots than source frequencies keep their rotation and every other component loses it. The
    frequencies stay on the host, as the conversion has them."""
    torch.manual_seed(4)
    H, G, F, D, L, delta = 4, 2, 8, 16, 12, 5
    k = torch.randn(G, F, D, dtype=torch.complex128).to(device)
    q = torch.randn(H, F, D, dtype=torch.complex128).to(device)
    x = torch.randn(200, D).to(device)
    freq = 10000.0 ** (-torch.arange(F) / F)
    dist = torch.zeros(H, L, device=device)
    dist[:, delta] = 3.0
    tgt = freq[rope.kept_frequencies(F, slots, strategy)]
    split = rope.rorope(k, q, x.T @ x / 200, freq, tgt, rope.slot_groups(F, slots, strategy), dist=dist)
    freq, tgt = freq.to(device), tgt.to(device)
    for t in (delta, delta + 4):
        xt, xs = x[t], x[t - delta]
        for h in range(H):
            ref = _scores(q[h] @ xt.to(q.dtype), k[h // 2] @ xs.to(k.dtype), freq, t, t - delta)
            rot = _scores(split.q_rot[h] @ xt.to(q.dtype), split.k_rot @ xs.to(k.dtype), tgt, t, t - delta)
            nope = _scores(split.q_nope[h] @ xt.to(q.dtype), split.k_nope[h // 2] @ xs.to(k.dtype),
                           torch.zeros(F, device=device), t, t - delta)
            torch.testing.assert_close(rot + nope, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_weight", [1.0, 0.5])
def test_gqa_is_already_mla_at_full_rank(device: str, key_weight: float) -> None:
    """The joint latent at full rank reproduces every head's key and value, whatever the keys'
    weight: GQA is MLA."""
    torch.manual_seed(2)
    G, d, D = 2, 8, 32
    k, v = torch.randn(G * d, D).to(device), torch.randn(G * d, D).to(device)
    x = torch.randn(500, D).to(device)
    latent = joint_latent(k, v, x.T @ x / 500, 2 * G * d, key_weight=key_weight)
    c = x @ latent.down.T
    torch.testing.assert_close(c @ latent.k_up.T, x @ k.T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(c @ latent.v_up.T, x @ v.T, rtol=1e-9, atol=1e-9)
    assert latent.error < 1e-9 and latent.optimum < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_joint_latent_reaches_the_rank_r_optimum(device: str) -> None:
    torch.manual_seed(3)
    k, v = torch.randn(16, 32).to(device), torch.randn(16, 32).to(device)
    x = (torch.randn(400, 32) @ torch.randn(32, 32)).to(device)
    latent = joint_latent(k, v, x.T @ x / 400, 12, balance=False)
    assert abs(latent.error - latent.optimum) < 1e-9
    weight_only = joint_latent(k, v, x.T @ x / 400, 12, balance=False, activation_aware=False)
    assert weight_only.error > latent.error
    # the keys' weight moves the budget between keys and values, each split still the optimum of its metric
    light, heavy = (joint_latent(k, v, x.T @ x / 400, 12, key_weight=w) for w in (0.25, 4.0))
    assert light.k_error > heavy.k_error and light.v_error < heavy.v_error
    assert abs(light.error - light.optimum) < 1e-9 and abs(heavy.error - heavy.optimum) < 1e-9


def test_latent_norm_trick_holds_for_worst_case_inputs() -> None:
    """After the trick, kv_a_layernorm(c) equals the plain latent for the largest possible input."""
    torch.manual_seed(4)
    D, r = 64, 16
    latent, gamma = torch.randn(r, D) * 3, torch.rand(D) + 0.5
    scaled, weight = latent_norm_trick(latent, gamma, D)
    _, _, vh = torch.linalg.svd(latent * gamma)
    worst = vh[0] * math.sqrt(D)  # normed input direction that maximizes ||latent (gamma * n)||
    for n in (worst, torch.randn(D)):
        x = gamma * rms_norm(n[None], torch.ones(D), 1e-6)[0]
        got = rms_norm((scaled @ x)[None], weight, deepseek.LATENT_NORM_EPS)[0]
        torch.testing.assert_close(got, latent @ x, rtol=1e-6, atol=0)
    torch.testing.assert_close(plain_latent(scaled, weight), latent)


def test_the_exact_formats_norm_constant_is_exact_in_bf16() -> None:
    """sqrt(eps) / alpha is a power of two: stored in bf16 it equals the float64 constant, so that the
    latent it restores carries no uniform scale error on the layer's keys and values (only the
    per-element rounding of the stored rows, which averages out)."""
    torch.manual_seed(8)
    for scale in (1e-3, 0.37, 1.0, 9.1, 250.0):
        latent, gamma = torch.randn(64, 256) * scale, torch.rand(256) + 0.5
        scaled, weight = latent_norm_trick(latent, gamma, 256)
        stored = weight.to(torch.bfloat16).double()
        assert torch.equal(stored, weight)
        restored = plain_latent(scaled.to(torch.bfloat16).double(), stored)
        assert abs(((restored * latent).sum() / (latent * latent).sum()).item() - 1) < 1e-4


def _source_spec(cfg: LlamaConfig) -> SourceSpec:
    return SourceSpec("llama", cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      1, cfg.intermediate_size, cfg.vocab_size, cfg.rms_norm_eps, 64, True, False, cfg)


@pytest.mark.parametrize("tile_bytes", [4 * 2 * 4 * 23, 2**28])
def test_distance_histogram_in_tiles_equals_the_dense_sum(monkeypatch, tile_bytes: int) -> None:
    """Blockwise (one query row per tile, and one tile for all) equals summing each diagonal of the
    full causal attention matrix."""
    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=48, num_hidden_layers=1, vocab_size=10)
    spec = _source_spec(cfg)
    w = lambda rows: torch.randn(rows, 32) * 0.5  # noqa: E731
    layer = SourceLayer(w(32), w(16), w(16), w(32), None, None, None, torch.ones(32), torch.ones(32),
                        w(48), w(48), torch.randn(32, 48))
    x = torch.randn(2, 23, 32)
    cos, sin = rope_tables(LlamaRotaryEmbedding(cfg).inv_freq, 23)
    q, k, _ = source_qkv(x, layer, spec, cos, sin)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(8)
    probs = scores.masked_fill(~torch.ones(23, 23, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    dense = torch.stack([probs.diagonal(-d, -2, -1).sum((0, -1)) for d in range(23)], dim=-1)
    monkeypatch.setattr(forward, "ACTIVATION_BYTES", tile_bytes)
    torch.testing.assert_close(attention_distance_histogram(q, k, spec), dense, rtol=1e-5, atol=1e-6)


def test_functional_source_layer_matches_transformers() -> None:
    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=48, num_hidden_layers=1, vocab_size=10, attn_implementation="sdpa")
    ref = LlamaDecoderLayer(cfg, 0).double()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 else 0.0, 0.3)
    sa, mlp = ref.self_attn, ref.mlp
    layer = SourceLayer(sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight, sa.o_proj.weight, None, None, None,
                        ref.input_layernorm.weight, ref.post_attention_layernorm.weight, mlp.gate_proj.weight,
                        mlp.up_proj.weight, mlp.down_proj.weight)
    h = torch.randn(2, 12, 32)
    rotary = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(12)[None]
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
    expected = ref(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary(h, pos))
    cos, sin = rope_tables(rotary.inv_freq, 12)
    got = source_layer(h, layer, _source_spec(cfg), cos.double(), sin.double())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_functional_mla_attention_matches_transformers() -> None:
    torch.manual_seed(6)
    cfg = DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                           kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                           num_hidden_layers=1, first_k_dense_replace=1, vocab_size=10,
                           attn_implementation="sdpa", rope_interleave=True)
    ref = DeepseekV3Attention(cfg, 0).double()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 1.0 if p.dim() == 1 else 0.0, 0.3)
    x = torch.randn(2, 9, 32)
    rotary = DeepseekV3RotaryEmbedding(cfg)
    pos = torch.arange(9)[None]
    mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    expected, _ = ref(x, position_embeddings=rotary(x, pos), attention_mask=mask)
    w = MLAWeights(ref.q_proj.weight, ref.kv_a_proj_with_mqa.weight, ref.kv_a_layernorm.weight,
                   ref.kv_b_proj.weight, ref.o_proj.weight)
    cos, sin = rope_tables(rotary.inv_freq, 9)
    got = mla_attention(x, w, 4, 8, 4, 6, cos.double(), sin.double(), norm_eps=ref.kv_a_layernorm.variance_epsilon)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_freqfold_split_keeps_every_score_when_folded_frequencies_are_equal(device: str) -> None:
    """foldN mixes neighbouring frequencies into N slots; with equal frequencies in a group the
    rotations commute with the mixing, so the split loses nothing before truncation."""
    torch.manual_seed(2)
    H, G, F, D = 4, 2, 8, 20
    k = torch.randn(G, F, D, dtype=torch.complex128).to(device)
    q = torch.randn(H, F, D, dtype=torch.complex128).to(device)
    x = torch.randn(100, D).to(device)
    freq = torch.full((F,), 0.3, device=device)
    split = rope.rorope(k, q, x.T @ x / 100, freq, freq, rope.slot_groups(F, F, "fold4"))
    xt, xs = x[3], x[4]
    for h in range(H):
        ref = _scores(q[h] @ xt.to(q.dtype), k[h // 2] @ xs.to(k.dtype), freq, 9, 1)
        rot = _scores(split.q_rot[h] @ xt.to(q.dtype), split.k_rot @ xs.to(k.dtype), freq, 9, 1)
        nope = _scores(split.q_nope[h] @ xt.to(q.dtype), split.k_nope[h // 2] @ xs.to(k.dtype), freq, 9, 1)
        torch.testing.assert_close(rot + nope, ref, rtol=1e-10, atol=1e-10)
    assert rope.slot_groups(8, 4, "fold2") == [([0, 1, 2, 3], [0, 1]), ([4, 5, 6, 7], [2, 3])]


@pytest.mark.parametrize("device", DEVICES)
def test_output_refit_normal_equations(device: str) -> None:
    """The refit's error from the normal equations equals the direct sum; and its ridge does what it is
    for: along strongly excited inputs the refit reaches the map the data holds, along a weakly excited
    one (as attention-sink heads give) it keeps the prior instead of fitting noise (which a ridge of 0
    would not, and a ridge too strong would not reach the data), doing better than the prior."""
    from mlakit.convert.factorize import LeastSquares

    torch.manual_seed(3)
    a = (torch.randn(500, 12) * torch.logspace(0, -4, 12)).to(device)  # input k excited with scale 10^(-4k/11)
    w_true, w_old = torch.randn(5, 12).to(device), torch.randn(5, 12).to(device)
    fit = LeastSquares(12, 5, device)
    for chunk in a.split(128):
        fit.update(chunk, chunk @ w_true.T)
    assert fit.error(w_old) == pytest.approx(((a @ (w_old - w_true).T) ** 2).sum().item(), rel=1e-8, abs=0)
    got = fit.solve(w_old, 1e-2)
    assert (got[:, 0] - w_true[:, 0]).abs().max() < 1e-2  # energy 500 against a ridge of 0.5: the data's map
    assert (got[:, -1] - w_old[:, -1]).abs().max() < 1e-3  # energy 5e-6 against a ridge of 0.5: the prior
    assert fit.error(got) < 1e-3 * fit.error(w_old)


def test_filled_value_dims_compute_the_padded_attention() -> None:
    """The error pass runs attention on the source's head sizes plus the value dims the conversion
    filled (`unpadded` with v_dim); what it fits is what the written, padded block computes."""
    torch.manual_seed(7)
    heads, d, nope, rope, v_head, rank, v_dim, hidden = 4, 8, 16, 4, 16, 12, 12, 32
    spec = SimpleNamespace(heads=heads, head_dim=d)
    shape = SimpleNamespace(qk_nope=nope, v_head=v_head, qk_head=nope + rope)
    q = torch.randn(heads, nope + rope, hidden, dtype=torch.float64)
    q[:, d:nope] = 0  # the nope key's padding
    kv_b = torch.randn(heads, nope + v_head, rank, dtype=torch.float64)
    kv_b[:, d:nope] = 0
    kv_b[:, nope + v_dim:] = 0  # value dims past the filled ones
    o = padded_columns(torch.randn(hidden, heads * v_dim, dtype=torch.float64), spec, shape, v_dim)
    w = MLAWeights(q.flatten(0, 1), torch.randn(rank + rope, hidden, dtype=torch.float64), torch.ones(rank),
                   kv_b.flatten(0, 1), o)
    x = torch.randn(2, 9, hidden, dtype=torch.float64)
    cos, sin = rope_tables(1.0 / 10000 ** (torch.arange(0, rope, 2) / rope), 9)
    padded = mla_attention(x, w, heads, nope, rope, v_head, cos.double(), sin.double(), norm_eps=None,
                           scale=(nope + rope) ** -0.5)
    small = mla_attention(x, unpadded(w, spec, shape, v_dim), heads, d, rope, v_dim, cos.double(), sin.double(),
                          norm_eps=None, scale=(nope + rope) ** -0.5)
    torch.testing.assert_close(small, padded, rtol=1e-12, atol=1e-12)
