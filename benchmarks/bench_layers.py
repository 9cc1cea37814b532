"""Where a conversion loses, layer by layer: teacher-forced attention errors on held-out windows.

Every layer gets the source's own hidden states (calibration windows for the conversion, held-out
windows for the measurement) and is converted as `mlakit convert` converts it; the error of a row
is ||y - y_src|| / ||y_src|| of the attention output through the source's o_proj (no o_proj refit),
over all held-out tokens. Far cheaper than whole conversions: one pass of the source over the
windows (its MLP in fp32, fast on every CPU), and no perplexity.

Variants (`--variants`, each at `--ranks` unless it says otherwise):
- mlakit: the conversion as `convert` does it, rope strategy `--strategy`;
- rope alone: the same at the full latent (rank 2 * kv_heads * head_dim - rope dim), so that only
  the rope step loses;
- rope alone, k bias exact: as if the format had a k bias: the layer input gets a constant channel
  and the k bias becomes its weight column, so the rope step sees the bias exactly and nothing is
  absorbed (q and v biases absorbed as usual);
- rope alone, k bias dropped: the k bias is left out of the conversion (the source keeps it);
- rope alone, no k bias: the k bias zeroed in the source too (the reference changes);
- latent alone: keys and values through the rank-r joint latent with every bias exact and the
  source's own RoPE on every key dim (not a DeepSeek-V3 layout: it isolates the latent's loss);
- TransMLA-style: `bench_quality.py`'s reimplementation of TransMLA's published choices.
`sink` columns give the attention mass on each window's first token, averaged over heads and
query positions, for the source and for the first variant.

    python scripts/stdlib_code.py --out code.txt
    python benchmarks/bench_layers.py --model ~/.cache/mlakit/Qwen2.5-Coder-1.5B-Instruct \\
        --eval code.txt shakespeare.txt --ranks 64 --layers 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from bench_quality import methods
from transformers import AutoTokenizer

from mlakit.convert.attention import convert_attention, unpadded
from mlakit.convert.candidates import candidate
from mlakit.convert.factorize import SecondMoment, absorb_bias, joint_latent
from mlakit.convert.plan import ConvertOptions
from mlakit.core import deepseek
from mlakit.core.checkpoint import CheckpointReader, resolve_model
from mlakit.core.families import SourceLayer, SourceSpec, load_spec
from mlakit.core.forward import (
    attend,
    attention_distance_histogram,
    linear,
    mla_qkv,
    rms_norm,
    rope_tables,
    rotate_half_rope,
    source_qkv,
)
from mlakit.core.stream import LayerStream, Rows, SourceModel
from mlakit.core.text import load_corpus, token_windows

VARIANTS = ("mlakit", "rope alone", "rope alone, k bias exact", "rope alone, k bias dropped",
            "rope alone, no k bias", "latent alone", "TransMLA-style")


def with_constant(x: torch.Tensor) -> torch.Tensor:
    """Inputs with a constant channel appended, through which a bias becomes a weight column."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def constant_moment(stats: SecondMoment) -> SecondMoment:
    """The second moment of `with_constant` inputs, from that of the inputs."""
    dim = stats.xx.shape[0]
    out = SecondMoment(dim + 1)
    out.xx[:dim, :dim], out.xx[:dim, dim], out.xx[dim, :dim] = stats.xx, stats.x, stats.x
    out.xx[dim, dim] = stats.count
    out.x[:dim], out.x[dim] = stats.x, stats.count
    out.count = stats.count
    return out


def k_bias_exact(layer: SourceLayer, stats: SecondMoment) -> SourceLayer:
    """The layer on `with_constant` inputs: the k bias is k_proj's last column, q and v biases
    absorbed as convert absorbs them, o_proj with a zero row for the constant channel."""
    def absorbed(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.pad(absorb_bias(w, b, stats.sigma, stats.mean).float(), (0, 1))

    return dataclasses.replace(layer, q=absorbed(layer.q, layer.q_bias), v=absorbed(layer.v, layer.v_bias),
                               k=torch.cat([layer.k, layer.k_bias[:, None]], dim=1), o=F.pad(layer.o, (0, 0, 0, 1)),
                               q_bias=None, k_bias=None, v_bias=None)


def first_token_mass(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """Mean attention probability on key 0 over heads and query positions 1.. (causal)."""
    scores = (q @ k.transpose(-1, -2)).float() * scale
    n = scores.shape[-1]
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)[..., 1:, 0].mean().item()


def latent_alone(layer: SourceLayer, spec: SourceSpec, stats: SecondMoment, rank: int, x: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Attention with keys and values through the rank-r joint latent (output-aware metrics, every
    bias exact through a constant channel) and the source's RoPE on every key dim."""
    H, G, d = spec.heads, spec.kv_heads, spec.head_dim
    aug = constant_moment(stats)
    wq, wk, wv = (torch.cat([w, b[:, None]], 1).double() if b is not None else F.pad(w.double(), (0, 1))
                  for w, b in ((layer.q, layer.q_bias), (layer.k, layer.k_bias), (layer.v, layer.v_bias)))
    group_of = torch.arange(H) // (H // G)
    qh = wq.view(H, d, -1)
    per_q = qh @ aug.sigma @ qh.transpose(1, 2)
    o_heads = layer.o.double().view(-1, H, d).permute(1, 2, 0)
    per_o = o_heads @ o_heads.transpose(1, 2)
    lat = joint_latent(wk, wv, aug.sigma, rank,
                       k_metric=torch.block_diag(*[per_q[group_of == g].sum(0) for g in range(G)]),
                       v_metric=torch.block_diag(*[per_o[group_of == g].sum(0) for g in range(G)]))
    xa = with_constant(x).double()
    b, n, _ = x.shape
    c = xa @ lat.down.T
    q = (xa @ wq.T).view(b, n, H, d).transpose(1, 2)
    k = (c @ lat.k_up.T).view(b, n, G, d).transpose(1, 2)
    v = (c @ lat.v_up.T).view(b, n, G, d).transpose(1, 2)
    cs, sn = cos[:n].double(), sin[:n].double()
    q, k = rotate_half_rope(q, cs, sn).float(), rotate_half_rope(k, cs, sn).float()
    k_full = k.repeat_interleave(spec.group, 1)
    return attend(q, k, v.float(), layer, spec), first_token_mass(q, k_full, d**-0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib-text", type=Path, nargs="*", default=None, help="default: the bundled docstrings")
    ap.add_argument("--eval", type=Path, nargs="+", required=True, help="held-out text files (their first tokens)")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="layers to report (default: all)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64])
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--strategy", default="fold")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: unknown variants {sorted(unknown)}; choose among {list(VARIANTS)}")

    base = ConvertOptions(rope_dim=args.rope_dim, rope_strategy=args.strategy, calib_text=args.calib_text,
                          calib_tokens=args.calib_tokens, calib_seq_len=args.calib_seq_len, dtype="fp32")
    folder = resolve_model(args.model)
    spec, reader = load_spec(folder), CheckpointReader(folder)
    if not spec.qkv_bias and any("k bias" in v for v in args.variants):
        raise SystemExit(f"error: {args.model} has no k bias; leave out the k bias variants")
    full = 2 * spec.kv_heads * spec.head_dim - args.rope_dim
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = token_windows(tokenizer, load_corpus(args.calib_text).text, args.calib_tokens, args.calib_seq_len,
                          spread=True)
    evals = {p.name: token_windows(tokenizer, p.read_text(encoding="utf-8"), args.eval_tokens, args.seq_len,
                                   what="evaluation") for p in args.eval}
    # (name, rank, option overrides, bias handling)
    rows: list[tuple[str, int, dict, str]] = []
    transmla = methods(spec, args.rope_dim)["TransMLA-style"]
    for v in args.variants:
        if v.startswith("rope alone"):
            rows.append((v, full, {}, v.removeprefix("rope alone").removeprefix(", ") or "absorbed"))
        else:
            rows += [(v, r, transmla if v == "TransMLA-style" else {}, "absorbed") for r in args.ranks]
    plans = {}
    qk_nope, v_head = deepseek.head_dims(spec.head_dim)
    for _, rank, kw, _ in rows:
        key = (rank, kw.get("rope_strategy", args.strategy))
        if key not in plans:
            # make_plan would also time matmuls for its estimate; candidate() reads only these fields
            shape = deepseek.MLAShape(spec.hidden, spec.heads, qk_nope, args.rope_dim, v_head, rank)
            plan = SimpleNamespace(spec=spec, shape=shape, dtype=torch.float32, latent="exact")
            plans[key] = (shape, candidate(plan, key[1], base.llama3_rope))

    print(f"model {args.model}: {spec.layers} layers, {spec.heads} q / {spec.kv_heads} kv heads of {spec.head_dim}, "
          f"rope dim {args.rope_dim}, strategy {args.strategy}; calibration {calib.numel()} tokens of "
          f"{load_corpus(args.calib_text).name} in windows of {args.calib_seq_len}; held-out: "
          + ", ".join(f"{k} ({w.shape[0]} windows of {args.seq_len})" for k, w in evals.items()))
    names = [f"{n} r{r}" if not n.startswith("rope alone") else n for n, r, _, _ in rows]
    cols = [f"{n}: {e}" for n in names for e in evals] + [f"sink src: {e}" for e in evals] + \
        [f"sink {names[0]}: {e}" for e in evals]
    print("\n| layer | k bias share | absorbed k bias left | " + " | ".join(cols) + " |")
    print("|---:|---:|---:|" + "---:|" * len(cols))

    source = SourceModel(spec, reader, max(args.calib_seq_len, args.seq_len), "cpu")
    stream = LayerStream(source, {"calib": Rows(calib), **{k: Rows(w) for k, w in evals.items()}},
                         max(spec.intermediate, spec.hidden))
    report = set(range(spec.layers) if args.layers is None else args.layers)
    for step in stream:
        if step.index > max(report):
            break
        with torch.no_grad():
            if step.index in report:
                hidden = {k: stream.hidden(k) for k in stream.parts}
                print(layer_row(step.index, step.source, spec, hidden, rows, plans, base, source.cos, source.sin,
                                args), flush=True)
            step.advance()


def layer_row(i: int, layer: SourceLayer, spec: SourceSpec, hidden: dict[str, torch.Tensor], rows: list,
              plans: dict, base: ConvertOptions, cos: torch.Tensor, sin: torch.Tensor, args) -> str:
    """One table row: layer i's statistics on the calibration windows, each variant converted from
    them and measured on every held-out set."""
    stats = SecondMoment(spec.hidden)
    dist = torch.zeros(spec.heads, args.calib_seq_len, dtype=torch.float64)
    for sl in range(0, hidden["calib"].shape[0], 4):
        x = rms_norm(hidden["calib"][sl:sl + 4], layer.input_norm, spec.rms_eps)
        stats.update(x)
        q, k, _ = source_qkv(x, layer, spec, cos, sin)
        if sl * args.calib_seq_len < base.histogram_tokens:
            dist += attention_distance_histogram(q, k, spec)
    k_src = linear(rms_norm(hidden["calib"], layer.input_norm, spec.rms_eps), layer.k, layer.k_bias)
    bias_share = (layer.k_bias.pow(2).sum() / k_src.pow(2).sum(-1).mean()).item() if layer.k_bias is not None else 0.0
    coef = torch.linalg.solve(stats.sigma + 1e-6 * stats.sigma.diagonal().mean() * torch.eye(spec.hidden), stats.mean)
    left = (1 - stats.mean @ coef).item()
    errors: list[float] = []
    sinks_src, sinks_first = [], []
    for name, rank, kw, bias in rows:
        shape, cand = plans[(rank, kw.get("rope_strategy", args.strategy))]
        opts = dataclasses.replace(base, kv_lora_rank=rank, **kw)
        src_layer, conv_layer, const = layer, layer, False
        if bias == "k bias exact":
            conv_layer, const = k_bias_exact(layer, stats), True
        elif bias == "k bias dropped":
            conv_layer = dataclasses.replace(layer, k_bias=None)
        elif bias == "no k bias":
            src_layer = conv_layer = dataclasses.replace(layer, k_bias=None)
        if name != "latent alone":
            conv_stats = constant_moment(stats) if const else stats
            conv_spec = dataclasses.replace(spec, hidden=spec.hidden + const)
            w, _ = convert_attention(conv_layer, conv_spec, shape, conv_stats, dist, cand, opts)
            w = unpadded(w, conv_spec, shape)
            tcos, tsin = rope_tables(cand.tgt_freq, cos.shape[0])
        for key in hidden:
            if key == "calib":
                continue
            x = rms_norm(hidden[key], layer.input_norm, spec.rms_eps)
            ref_q, ref_k, ref_v = source_qkv(x, src_layer, spec, cos, sin)
            ref = attend(ref_q, ref_k, ref_v, src_layer, spec)
            if name == "latent alone":
                out, mass = latent_alone(layer, spec, stats, rank, x, cos, sin)
            else:
                xin = with_constant(x) if const else x
                q, k, v = mla_qkv(xin, w, spec.heads, spec.head_dim, shape.qk_rope, spec.head_dim, tcos, tsin,
                                  norm_eps=None)
                scale = shape.qk_head**-0.5
                heads = F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - v.shape[-1])), is_causal=True,
                                                       scale=scale)[..., :spec.head_dim]
                out = linear(heads.transpose(1, 2).flatten(2), w.o)[..., :spec.hidden]
                mass = first_token_mass(q, k, scale)
            errors.append(((out - ref).norm() / ref.norm()).item())
            if len(sinks_first) < len(hidden) - 1:
                sinks_first.append(mass)
                sinks_src.append(first_token_mass(ref_q, ref_k.repeat_interleave(spec.group, 1), spec.head_dim**-0.5))
    cells = [f"{e:.3f}" for e in errors] + [f"{m:.3f}" for m in sinks_src + sinks_first]
    return f"| {i} | {bias_share:.3f} | {left:.4f} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
