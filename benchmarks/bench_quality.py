"""One-shot quality against KV-cache budget: perplexity of the source and of its conversions.

Protocol: conversions calibrate on the first 90% of `--text` and never see the evaluation text:
the last 10% of `--text` and of each `--also-eval` file (with `--mixed`, calibration also takes the
first 90% of each `--also-eval` file), `--eval-tokens` of each cut into windows
of `--seq-len` tokens (and, with `--long-seq-len`, `--long-tokens` in windows of that length).
Perplexity is measured in fp32 by transformers itself (the source as LlamaForCausalLM, the
conversion as DeepseekV3ForCausalLM); conversions are written in fp32 so that the table shows
approximation error, not rounding. Each row also gives the conversion's wall time.

`--eval-bos` also evaluates every held-out set with windows that start with the tokenizer's
bos_token (as served prompts do), the prediction made at the BOS position not scored; `--calib-bos
on` converts with calibration windows that start with it too, `both` gives each method both ways.

Methods (`--methods`, all by default):
- mlakit: the defaults of `mlakit convert`;
- no o_proj refit: without the least-squares refit of o_proj;
- input-aware latent / weight SVD latent: the latent from the input covariance alone / from weights;
- lost rotations dropped: rotations that do not fit the shared rotary key are dropped, not averaged;
- TransMLA-style: TransMLA's published choices reimplemented: real PCA across kv heads with
  FreqFold 4 (4 neighbouring source frequencies share a PCA), lost rotations dropped, K balanced
  to V by norm, input-covariance PCA latent, no refit;
- full latent: the largest kv_lora_rank, so that only the rope step loses anything;
- llama3 kept: llama3 rope scaling written as llama3 (exact in transformers, which the table
  measures) instead of the YaRN that every engine reads (only differs for llama3 sources).

`--llama3-scaling` evaluates a copy of the model whose config has Llama 3.1's rope scaling
(factor 8, low/high frequency factors 1/4, original context = the model's own), weights shared:
the source and both ways of writing its rope can then be compared at long context.

    python benchmarks/bench_quality.py                                   # bundled demo model
    python benchmarks/bench_quality.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct \\
        --text shakespeare.txt --also-eval demo/docstrings.txt --ranks 128 32
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.core.checkpoint import resolve_model
from mlakit.core.families import SourceSpec, load_spec
from mlakit.core.text import DEFAULT_TEXT, bos_token, token_windows


def methods(spec: SourceSpec, rope_dim: int) -> dict[str, dict]:
    """Option overrides per method; TransMLA's FreqFold 4 is 4 source frequencies per PCA group."""
    slots, n_freq = rope_dim // 2, spec.head_dim // 2
    freqfold4 = f"fold{max(1, 4 * slots // n_freq)}"
    return {
        "mlakit": {},
        "no o_proj refit": {"refit_output": False},
        "input-aware latent": {"output_aware": False},
        "weight SVD latent": {"activation_aware": False, "output_aware": False},
        "lost rotations dropped": {"expected_rotation": False},
        "TransMLA-style": {"complex_pca": False, "expected_rotation": False, "rope_strategy": freqfold4,
                           "output_aware": False, "refit_output": False},
        "full latent": {"kv_lora_rank": 2 * spec.kv_heads * spec.head_dim - rope_dim},
        "llama3 kept": {"llama3_rope": "keep"},
    }


def with_llama3_scaling(folder: Path, into: Path) -> Path:
    """A copy of `folder` (weights linked, not copied) whose config has Llama 3.1's rope scaling."""
    into.mkdir()
    for f in folder.iterdir():
        (into / f.name).symlink_to(f.resolve())
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": config["max_position_embeddings"]}
    config["max_position_embeddings"] *= 8
    (into / "config.json").unlink()
    (into / "config.json").write_text(json.dumps(config, indent=2))
    return into


def scored(windows: torch.Tensor, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows and their labels; with a leading BOS, the first text token (predicted from the BOS
    alone) is not scored, so that the same predictions count as without it."""
    labels = windows.clone()
    if bos:
        labels[:, 1] = -100
    return windows, labels


@torch.no_grad()
@torch.no_grad()
def token_nll(model: Path | torch.nn.Module, sets: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Next-token negative log-likelihood on each set of (windows, labels) of a model or a model folder
    (loaded once, fp32): (windows, seq_len - 1) per set, NaN where the label is -100 (not scored)."""
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    for rows, labels in sets:
        nll = []
        for w, y in zip(rows, labels):
            target = y[1:]
            loss = F.cross_entropy(model(w[None]).logits[0, :-1].float(), target.clamp_min(0), reduction="none")
            nll.append(loss.masked_fill(target < 0, float("nan")))
        out.append(torch.stack(nll))
    return out


def nll_perplexity(nll: torch.Tensor) -> float:
    """Perplexity of token NLLs from `token_nll` (its NaNs, unscored labels, left out)."""
    return math.exp(nll.nanmean().item())


def perplexity(model: Path | torch.nn.Module, sets: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Perplexity on each set of (windows, labels) of a model or a model folder (loaded once, fp32)."""
    return [nll_perplexity(nll) for nll in token_nll(model, sets)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration (first 90%%) and held-out text")
    ap.add_argument("--also-eval", type=Path, nargs="*", default=[], help="more held-out text (last 10%% of each)")
    ap.add_argument("--mixed", action="store_true",
                    help="calibrate on the first 90%% of every text, --also-eval ones included")
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--rope-dims", type=int, nargs="+", default=[64])
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the methods, by name")
    ap.add_argument("--calib-tokens", type=int, default=ConvertOptions.calib_tokens)
    ap.add_argument("--calib-seq-len", type=int, default=ConvertOptions.calib_seq_len)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256, help="evaluation window")
    ap.add_argument("--long-seq-len", type=int, default=0, help="also evaluate at this context (0: no)")
    ap.add_argument("--long-tokens", type=int, default=8192)
    ap.add_argument("--llama3-scaling", action="store_true", help="give the model Llama 3.1's rope scaling")
    ap.add_argument("--eval-bos", action="store_true", help="also evaluate windows that start with the BOS token")
    ap.add_argument("--calib-bos", choices=["off", "on", "both"], default="off",
                    help="calibration windows start with the BOS token: off, on, or each method both ways")
    args = ap.parse_args()
    logging.set_verbosity_error()
    scratch = tempfile.TemporaryDirectory()
    folder = resolve_model(args.model)
    if args.llama3_scaling:
        folder = with_llama3_scaling(folder, Path(scratch.name) / "llama3")
        args.model = str(folder)
    spec = load_spec(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = {p.name: p.read_text(encoding="utf-8") for p in [args.text, *args.also_eval]}
    held_out = {name: t[int(0.9 * len(t)):] for name, t in texts.items()}
    cuts = [(name, t, args.eval_tokens, args.seq_len) for name, t in held_out.items()]
    if args.long_seq_len:
        cuts.append((args.text.name, held_out[args.text.name], args.long_tokens, args.long_seq_len))
    sets = {}
    for bos in [False, True] if args.eval_bos else [False]:
        for name, t, n, seq_len in cuts:
            lead = bos_token(tokenizer) if bos else None
            sets[f"{name} @{seq_len}{' +BOS' if bos else ''}"] = scored(
                token_windows(tokenizer, t, n, seq_len, what="evaluation", lead=lead), bos)
    base = perplexity(folder, list(sets.values()))
    calib_names = list(texts) if args.mixed else [args.text.name]
    src_cache = spec.kv_elements_per_token_layer()
    print(f"model {args.model}: {spec.layers} layers, {spec.heads} q / {spec.kv_heads} kv heads of {spec.head_dim}; "
          f"calibration: {args.calib_tokens} tokens of the first 90% of {' and '.join(calib_names)} in windows of "
          f"{args.calib_seq_len}; held-out: " + ", ".join(f"{k} ({v[0].shape[0]} windows)" for k, v in sets.items()))
    print("source perplexity: " + ", ".join(f"{k} {p:.3f}" for k, p in zip(sets, base))
          + f"; source KV cache {src_cache} elements per token per layer\n")
    print("| rope dim | kv_lora_rank | cache vs source | method | convert s | "
          + " | ".join(f"ppl {k} | vs source" for k in sets) + " |")
    print("|---:|---:|---:|---|---:|" + "---:|---:|" * len(sets))
    with tempfile.TemporaryDirectory() as tmp:
        calib = []
        for name in calib_names:
            calib.append(Path(tmp) / f"calib-{name}")
            calib[-1].write_text(texts[name][: int(0.9 * len(texts[name]))], encoding="utf-8")
        for rope_dim in args.rope_dims:
            table = methods(spec, rope_dim)
            if rope_dim < spec.head_dim:
                table.update({f"mlakit, rope {s}": {"rope_strategy": s} for s in ("fold", "even", "high")})
            chosen = {k: v for k, v in table.items() if args.methods is None or k in args.methods}
            if args.calib_bos != "off":
                with_bos = {f"{k}, BOS calibration": {**v, "calib_bos": True} for k, v in chosen.items()}
                chosen = with_bos if args.calib_bos == "on" else {**chosen, **with_bos}
            for rank in args.ranks:
                for name, kw in chosen.items():
                    if name.startswith("full latent") and rank != args.ranks[0]:
                        continue
                    opts = ConvertOptions(**{"kv_lora_rank": rank, "rope_dim": rope_dim, "calib_text": calib,
                                             "dtype": "fp32", "calib_tokens": args.calib_tokens,
                                             "calib_seq_len": args.calib_seq_len, **kw})
                    if opts.kv_lora_rank > 2 * spec.kv_heads * spec.head_dim - rope_dim:
                        continue
                    out = Path(tmp) / "out"
                    start = time.perf_counter()
                    convert(args.model, out, opts, force=True, log=lambda m: None)
                    seconds = time.perf_counter() - start
                    ppl = perplexity(out, list(sets.values()))
                    share = 100 * (opts.kv_lora_rank + rope_dim) / src_cache
                    cells = " | ".join(f"{p:.3f} | {100 * (p / b - 1):+.2f}%" for p, b in zip(ppl, base))
                    print(f"| {rope_dim} | {opts.kv_lora_rank} | {share:.1f}% | {name} | {seconds:.0f} | {cells} |",
                          flush=True)


if __name__ == "__main__":
    main()
