"""What the exact latent format's rms_norm_eps costs, and what the native format's does not.

The exact format writes rms_norm_eps 1e-6 for every norm (core/deepseek.output_eps): its latent norm
must divide by sqrt(1e-6) in every engine, and the engines read that eps from rms_norm_eps for the
other norms too. A source trained with eps 1e-5 then runs its input, post-attention and final norms
at 1e-6. This measures that alone: the source as it is against the same source with rms_norm_eps
1e-6, on held-out windows (perplexity of both, mean and 99th percentile per-token KL).

Given a native conversion (`--native`), which keeps the source's eps, it also measures the one eps
on which engines still differ there: kv_a_layernorm at 1e-6 (transformers) against rms_norm_eps
(vLLM, SGLang, llama.cpp).

    python benchmarks/bench_eps.py --model demo --native ./demo-native --seq-len 256
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from mlakit.core.checkpoint import resolve_model
from mlakit.core.deepseek import LATENT_NORM_EPS
from mlakit.core.text import DEFAULT_TEXT, token_windows


@torch.no_grad()
def log_probs(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(w[None]).logits[0, :-1].float().log_softmax(-1) for w in windows])


def set_eps(model: torch.nn.Module, eps: float, latent: bool) -> None:
    """Every RMSNorm's eps: the latent norms (kv_a_layernorm) when `latent`, all the others when not."""
    for name, module in model.named_modules():
        if hasattr(module, "variance_epsilon") and name.endswith("kv_a_layernorm") == latent:
            module.variance_epsilon = eps


def compare(folder: Path, windows: torch.Tensor, eps: float, latent: bool) -> str:
    """One table row: the model as transformers runs it against the same model with `eps` set."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = log_probs(model, windows)
    set_eps(model, eps, latent)
    got = log_probs(model, windows)
    targets = windows[:, 1:].reshape(-1, 1)
    ppl = [math.exp(-lp.gather(-1, targets).mean().item()) for lp in (ref, got)]
    kl = (ref.exp() * (ref - got)).sum(-1).clamp_min(0)
    p99 = kl.sort().values[math.ceil(0.99 * len(kl)) - 1].item()
    return (f"{ppl[0]:.4f} | {ppl[1]:.4f} ({100 * (ppl[1] / ppl[0] - 1):+.3f}%) | {kl.mean().item():.2e} | "
            f"{p99:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--native", type=Path, default=None, help="a `convert --latent native` output of --model")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="evaluated on its last 10%%")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    source = resolve_model(args.model)
    text = args.text.read_text(encoding="utf-8")
    windows = token_windows(AutoTokenizer.from_pretrained(source), text[int(0.9 * len(text)):], args.tokens,
                            args.seq_len, what="evaluation")
    eps = AutoModelForCausalLM.from_pretrained(source).config.rms_norm_eps
    print(f"{args.model} (rms_norm_eps {eps:g}), {windows.numel()} tokens of {args.text.name} (last 10%) in windows "
          f"of {args.seq_len}\n")
    print("| model | what changes | perplexity as is | perplexity changed | KL mean | KL p99 |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| source | every norm at eps {LATENT_NORM_EPS:g} (what the exact format writes) | "
          + compare(source, windows, LATENT_NORM_EPS, latent=False))
    if args.native:
        native_eps = AutoModelForCausalLM.from_pretrained(args.native).config.rms_norm_eps
        row = compare(args.native, windows, native_eps, latent=True)
        print(f"| native conversion | kv_a_layernorm at rms_norm_eps {native_eps:g} (vLLM, SGLang, llama.cpp) "
              f"instead of {LATENT_NORM_EPS:g} (transformers) | {row}")


if __name__ == "__main__":
    main()
