"""Qwen2's q/k/v biases: what the conversion does with them, proven on tiny random models.

DeepSeek-V3 has no attention biases, so a bias survives only as far as the layer inputs explain it:
- the k bias on dims that carry no rotation adds q . b to every score of a query, a per-query
  constant that softmax removes, so dropping it is exact (shown where the source's own rotation
  of those dims is the identity: frequencies below float precision, MQA, the rotating ones kept);
- the q and v biases and the k bias on rotary dims are folded into the weights by least squares on
  the layer's calibration inputs (`absorb_bias`): the optimum in every output metric, exact when a
  fixed linear function of the inputs is 1 on every token, and an approximation otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer
from transformers import DeepseekV3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mlakit.convert import rope
from mlakit.convert.factorize import SecondMoment, absorb_bias
from mlakit.convert.pipeline import ConvertOptions, calibration_for, convert

HIDDEN, HEADS, HEAD_DIM, LAYERS = 64, 4, 16, 2
CALIB = dict(calib_tokens=2048, calib_seq_len=128, dtype="fp32")


def make_qwen2(rope_theta: float, seed: int = 0, kv_heads: int = 1, bias_std: float = 1.0,
               qk_std: float = 0.2) -> Qwen2ForCausalLM:
    """A random fp32 Qwen2 (MQA by default) whose biases are as large as its projections' outputs."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                      intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, vocab_size=256,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, bias_std)
            elif p.dim() == 1:
                p.normal_(1.0, 0.05)
            else:
                p.normal_(0, qk_std if "q_proj" in name or "k_proj" in name else 0.2)
    return model


def save(model: Qwen2ForCausalLM, folder: Path) -> Path:
    """The model as a source folder convert reads, with a byte tokenizer."""
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load_converted(folder: Path) -> DeepseekV3ForCausalLM:
    model, info = DeepseekV3ForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def rotary_dims(kept_freqs: list[int]) -> list[int]:
    """Dims of the rotate-half layout that frequencies rotate: f and f + head_dim / 2."""
    return kept_freqs + [f + HEAD_DIM // 2 for f in kept_freqs]


def test_k_bias_on_dims_without_rotation_drops_out_exactly(tmp_path: Path) -> None:
    """rope_theta 1e38 leaves two frequencies that rotate (1 and 1.8e-5 per position) and six below
    3.2e-10, which rotate by less than float precision over the context. With MQA, `high` keeps the
    two as the rope dims and the full latent keeps the rest unrotated: the conversion is exact, and
    the k bias on the unrotated dims, which DeepSeek-V3 cannot hold, drops out of both models'
    softmax. q and v biases are zero here: a bias-free format cannot hold them exactly (next test)."""
    model = make_qwen2(rope_theta=1e38)
    assert (model.model.rotary_emb.inv_freq[2:] < 1e-9).all()
    rot = rotary_dims([0, 1])
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.bias.zero_()
            attn.v_proj.bias.zero_()
            attn.k_proj.bias[rot] = 0.0
    src = save(model, tmp_path / "src")
    ids = torch.randint(0, 256, (2, 64))
    ref = logits(model, ids)

    unbiased = copy.deepcopy(model)
    with torch.no_grad():
        for layer in unbiased.model.layers:
            layer.self_attn.k_proj.bias.zero_()
    torch.testing.assert_close(logits(unbiased, ids), ref, rtol=1e-5, atol=1e-5)  # a per-query constant
    assert model.model.layers[0].self_attn.k_proj.bias.abs().mean() > 0.5  # not a small bias

    record = convert(str(src), tmp_path / "out", ConvertOptions(kv_lora_rank=2 * HEAD_DIM - 4, rope_dim=4,
                                                                 rope_strategy="high", **CALIB), log=lambda _: None)
    # attn_rel_error comes from float32 normal equations (yy - 2<W, AY> + <W, W AA>): it cannot
    # resolve errors below about sqrt(float32 eps) = 3e-4; the logits below are the exactness check
    assert all(row["attn_rel_error"] < 1e-3 for row in record["layers"]), record["layers"]
    torch.testing.assert_close(logits(load_converted(tmp_path / "out"), ids), ref, rtol=1e-4, atol=1e-4)


def layer_inputs(model: Qwen2ForCausalLM, windows: torch.Tensor) -> list[SecondMoment]:
    """Second moments of each layer's normed attention input on the windows, the source's hidden
    states carried through the source (what convert measures, computed here with transformers)."""
    stats = [SecondMoment(HIDDEN) for _ in range(LAYERS)]
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
        for layer, h, s in zip(model.model.layers, hidden, stats):
            s.update(layer.input_layernorm(h))
    return stats


def test_biases_become_their_least_squares_absorption(tmp_path: Path) -> None:
    """With every bias nonzero, the conversion (MQA, rope dim = head dim, full latent, o_proj kept,
    rotations not averaged, so that every channel keeps its whole k bias) is exactly the source
    with each bias folded into its weights by `absorb_bias` on the calibration statistics of that
    layer: absorption is the only approximation made, and no other weights do better than it
    (test_absorb_bias_is_the_least_squares_optimum)."""
    model = make_qwen2(rope_theta=10000.0)
    src = save(model, tmp_path / "src")
    opts = ConvertOptions(kv_lora_rank=HEAD_DIM, rope_dim=HEAD_DIM, refit_output=False, expected_rotation=False,
                          **CALIB)
    convert(str(src), tmp_path / "out", opts, log=lambda _: None)

    calib = calibration_for(str(src), opts)
    windows = calib.windows[:calib.fit_rows]  # the windows convert fits on
    absorbed = copy.deepcopy(model)
    with torch.no_grad():
        for layer, s in zip(absorbed.model.layers, layer_inputs(model, windows)):
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.copy_(absorb_bias(proj.weight, proj.bias, s.sigma, s.mean))
                proj.bias.zero_()
    ids = torch.randint(0, 256, (2, 64))
    got = logits(load_converted(tmp_path / "out"), ids)
    torch.testing.assert_close(got, logits(absorbed, ids), rtol=1e-4, atol=1e-4)


def _inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a mean, as normed hidden states have, conditioned well enough (sigma's
    condition number about 40) that `absorb_bias`'s ridge of 1e-6 of the mean energy stays invisible."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    mix = torch.eye(dim, dtype=torch.float64) + 0.3 * noise / dim**0.5
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mix + 0.7


def _moments(x: torch.Tensor) -> SecondMoment:
    stats = SecondMoment(x.shape[1])
    for chunk in x.split(100):
        stats.update(chunk)
    return stats


def _error(w: torch.Tensor, target: torch.Tensor, x: torch.Tensor, metric: torch.Tensor) -> float:
    """Mean over tokens of (W x - y)^T M (W x - y)."""
    r = x @ w.T - target
    return ((r @ metric) * r).sum(-1).mean().item()


def test_absorb_bias_is_the_least_squares_optimum() -> None:
    """`absorb_bias` from the running moments equals a direct least-squares solve on the tokens, and
    any step away from it raises the error, in the plain metric and in any other one: the optimum
    W + b mean^T sigma^-1 does not depend on how output errors are weighted."""
    torch.manual_seed(0)
    n, d_in, d_out = 800, 24, 10
    x = _inputs(n, d_in, seed=1)
    w, b = torch.randn(d_out, d_in, dtype=torch.float64), torch.randn(d_out, dtype=torch.float64)
    target = x @ w.T + b
    stats = _moments(x)
    got = absorb_bias(w, b, stats.sigma, stats.mean)
    direct = torch.linalg.lstsq(x, target).solution.T
    torch.testing.assert_close(got, direct, rtol=1e-6, atol=1e-6)

    a = torch.randn(d_out, d_out, dtype=torch.float64)
    for metric in (torch.eye(d_out, dtype=torch.float64), a @ a.T):
        best = _error(got, target, x, metric)
        assert best < _error(w, target, x, metric)  # better than dropping the bias
        for _ in range(20):
            step = 1e-3 * torch.randn(d_out, d_in, dtype=torch.float64)
            assert _error(got + step, target, x, metric) > best
    left = stats.mean @ torch.linalg.solve(stats.sigma, stats.mean)
    assert _error(got, target, x, torch.eye(d_out, dtype=torch.float64)) == pytest.approx(
        (b @ b).item() * (1 - left.item()), rel=1e-5)


def test_absorption_is_exact_only_when_the_inputs_carry_a_constant() -> None:
    """W' x = W x + b on every token when u^T x = 1 for some fixed u (here one input is constant);
    on inputs without such a direction a residual is left, ||b||^2 (1 - mean^T sigma^-1 mean) per token."""
    torch.manual_seed(2)
    w, b = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x = _inputs(500, 12, seed=3)
    x[:, 5] = 2.5
    stats = _moments(x)
    torch.testing.assert_close(x @ absorb_bias(w, b, stats.sigma, stats.mean).T, x @ w.T + b, rtol=1e-5, atol=1e-5)
    x = _inputs(500, 12, seed=3)
    stats = _moments(x)
    residual = x @ absorb_bias(w, b, stats.sigma, stats.mean).T - (x @ w.T + b)
    left = stats.mean @ torch.linalg.solve(stats.sigma, stats.mean)
    assert residual.pow(2).sum(-1).mean().item() == pytest.approx((b @ b).item() * (1 - left.item()), rel=1e-5)


def test_k_bias_is_kept_where_it_rotates_and_dropped_where_it_does_not() -> None:
    """An absorbed k bias is worth its rotation: on a channel that turns by 1e-5 rad over the
    attended distances the bias adds a per-query constant (dropped: the split is the one without
    it), on one that turns by a radian per token it shapes attention over distance (kept)."""
    torch.manual_seed(3)
    groups, heads, n_freq, dim = 2, 4, 4, 12
    c = lambda *s: torch.complex(torch.randn(*s, dtype=torch.float64), torch.randn(*s, dtype=torch.float64))
    k, q = c(groups, n_freq, dim), c(heads, n_freq, dim)
    sigma = torch.eye(dim, dtype=torch.float64)
    freqs = torch.tensor([1.0, 0.3, 0.1, 1e-7], dtype=torch.float64)
    dist = torch.ones(heads, 128, dtype=torch.float64)
    slots = rope.slot_groups(n_freq, n_freq, "high")
    bias = torch.zeros(groups, n_freq, dim, dtype=torch.complex128)
    bias[:, 3] = 1e3 * c(groups, dim)  # large, on the channel that does not rotate

    def split(rows: torch.Tensor | None) -> rope.RopeSplit:
        return rope.rorope(k, q, sigma, freqs, freqs, slots, dist=dist, k_bias_rows=rows, bias_residual=1e-2)

    plain = split(None)
    torch.testing.assert_close(split(bias).k_rot, plain.k_rot, rtol=1e-4, atol=1e-4)
    bias[:, 0], bias[:, 3] = bias[:, 3], 0
    assert (split(bias).k_rot[0] - plain.k_rot[0]).abs().max() > 10


def test_large_k_bias_with_two_kv_heads_converts_closely(tmp_path: Path) -> None:
    """A pico Qwen2 shaped like Qwen2.5's first layers: two kv heads folded into one shared rotary
    key (rope dim half the head dim, rope theta 1e6), a k bias 200 times the key's other entries on
    the frequencies that barely rotate, and a near-constant input channel (a massive activation)
    through which absorption can carry it, less exactly on tokens the calibration text never has.
    With the full latent (only the rope step loses), every layer's attention error and the logits'
    error on random bytes stay small."""
    model = make_qwen2(1e6, kv_heads=2, bias_std=0.5, qk_std=0.5)
    slow = [6, 7, 14, 15]  # the two lowest frequencies, both halves of the rotate-half pairs
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 8.0
        emb[128:, 0] += 2.0 * torch.randn(128)  # bytes the calibration text has none of
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.view(2, HEAD_DIM)[:, slow] = 200.0 * torch.randn(2, len(slow)).sign()
    src = save(model, tmp_path / "src")
    record = convert(str(src), tmp_path / "out", ConvertOptions(kv_lora_rank=4 * HEAD_DIM - 8, rope_dim=8, **CALIB),
                     log=lambda _: None)
    assert all(row["attn_rel_error"] < 0.1 for row in record["layers"]), record["layers"]
    ids = torch.randint(0, 256, (4, 128))
    ref = logits(model, ids)
    got = logits(load_converted(tmp_path / "out"), ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.1
