"""One-shot quality against KV-cache budget: perplexity of the source and of its conversions.

Calibrates on the first 90% of a text and evaluates on the last 10%, for mlakit's default method,
for a plain weight-SVD latent, for a TransMLA-style conversion (real PCA across kv heads, frequency
folding, lost rotations dropped), and, when the rope dim leaves source frequencies out, for each
rope-budget strategy. Conversions are written in fp32 so that the table shows approximation error,
not rounding.

    python benchmarks/bench_quality.py                                   # bundled demo model
    python benchmarks/bench_quality.py --model PATH --text ../shared/data/shakespeare.txt
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlakit.convert.checkpoint import resolve_model
from mlakit.convert.families import load_spec
from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.convert.text import DEFAULT_TEXT, token_windows

VARIANTS = {
    "mlakit": {},
    "input-aware PCA latent": {"output_aware": False},
    "lost rotations dropped": {"expected_rotation": False},
    "weight SVD latent": {"activation_aware": False, "output_aware": False},
    "TransMLA-style": {"complex_pca": False, "expected_rotation": False, "rope_strategy": "fold",
                       "output_aware": False},
}
STRATEGIES = {f"mlakit, rope {s}": {"rope_strategy": s} for s in ("fold", "even", "high")}


@torch.no_grad()
def perplexity(folder: Path, windows: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(nll) / len(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--rope-dims", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation window (the demo's "
                    "training length)")
    args = ap.parse_args()

    folder = resolve_model(args.model)
    spec = load_spec(folder)
    text = args.text.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    windows = token_windows(AutoTokenizer.from_pretrained(folder), text[cut:], args.eval_tokens, args.seq_len,
                            what="evaluation")
    base = perplexity(folder, windows)
    src_cache = spec.kv_elements_per_token_layer()
    print(f"model {args.model}: {spec.layers} layers, {spec.heads} q / {spec.kv_heads} kv heads of {spec.head_dim}; "
          f"eval on the last 10% of {args.text.name} ({windows.numel()} tokens), calibration on the first 90% "
          f"({args.calib_tokens} tokens)")
    print(f"source perplexity {base:.3f}; source KV cache {src_cache} elements per token per layer\n")
    print("| rope dim | kv_lora_rank | cache vs source | method | perplexity | vs source |")
    print("|---:|---:|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text(text[:cut], encoding="utf-8")
        for rope_dim in args.rope_dims:
            for rank in args.ranks:
                if rank > 2 * spec.kv_heads * spec.head_dim - rope_dim:
                    continue
                variants = dict(VARIANTS)
                if rope_dim < spec.head_dim and rank == args.ranks[len(args.ranks) // 2]:
                    variants.update(STRATEGIES)
                for name, kw in variants.items():
                    out = Path(tmp) / "out"
                    opts = ConvertOptions(kv_lora_rank=rank, rope_dim=rope_dim, calib_text=[calib], dtype="fp32",
                                          calib_tokens=args.calib_tokens, calib_seq_len=args.seq_len, **kw)
                    convert(args.model, out, opts, force=True, log=lambda m: None)
                    ppl = perplexity(out, windows)
                    share = 100 * (rank + rope_dim) / src_cache
                    print(f"| {rope_dim} | {rank} | {share:.1f}% | {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |",
                          flush=True)


if __name__ == "__main__":
    main()
