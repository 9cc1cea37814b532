"""Does a conversion survive weight quantization as well as its source does?

Converts the source (fp32 output, so that the table shows the quantization effect and not bf16
rounding; calibration on the first 90% of the text), then fake-quantizes every Linear weight of
the source and of each converted variant with the same scheme, and reports held-out perplexity
(last 10% of the text) and its change against the same model unquantized. Schemes, simulated in
torch on the weights only:

    f16        round to IEEE half (a GGUF F16 file)
    q8_0       GGUF q8_0: blocks of 32 along the input dim, int8 values, one f16 scale amax/127
    fp8        float8 e4m3 with one float32 scale amax/448 per tensor (vLLM's per-tensor fp8)
    int8       int8 with one float32 scale amax/127 per output channel

Latent variants:

    exact      the exact format: latent rows scaled down by the worst-case bound (latent_norm_trick)
    calibrated the same trick with the largest scale the calibration text allows: max over its
               tokens of the latent's mean square, times 16 (a 4x safety factor on its norm), kept
               at 1e-3 eps so that the norm's relative error stays below 5e-4
    native     the native format (`convert --latent native`): latent at its natural scale, the norm
               normalizing, a fitted latent metric, kv_b_proj refitted by least squares
    native, no metric   the same without the metric (plain latent directions)

    python benchmarks/bench_quant.py                                  # bundled demo model
    python benchmarks/bench_quant.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct \\
        --text PATH/shakespeare.txt --kv-lora-rank 128 --rope-dim 64
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.core.checkpoint import resolve_model
from mlakit.core.deepseek import LATENT_NORM_EPS
from mlakit.core.latent import NATIVE_METRIC_STEPS
from mlakit.core.text import DEFAULT_TEXT, token_windows
from mlakit.validate.quant import SCHEMES

# Largest mean square of the calibrated variant's latent, as a fraction of eps.
CALIBRATED_MARGIN = 1e-3
CALIBRATED_SAFETY = 4.0
# Native variants: with the fitted latent metric, and with the plain latent (identity metric).
NATIVE = {"native": NATIVE_METRIC_STEPS, "native, no metric": 0}


def load(folder: Path, scheme: str | None) -> torch.nn.Module:
    """The model in fp32 with every Linear weight fake-quantized (a tied lm_head gets its own copy)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if scheme:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(SCHEMES[scheme](module.weight.detach()), requires_grad=False)
    return model


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    nll = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(nll) / len(nll))


@torch.no_grad()
def calibrated(exact: Path, out: Path, windows: torch.Tensor) -> None:
    """The exact format rescaled to the calibration text's largest latent (see the module docstring)."""
    model = AutoModelForCausalLM.from_pretrained(exact, dtype=torch.float32).eval()
    rank = model.config.kv_lora_rank
    peaks: dict[int, float] = {}

    def hook(i: int):
        def fn(module, inputs, output):
            attn = model.model.layers[i].self_attn
            plain = output[..., :rank] * attn.kv_a_layernorm.weight / math.sqrt(LATENT_NORM_EPS)
            peaks[i] = max(peaks.get(i, 0.0), plain.pow(2).mean(-1).max().item())
        return fn

    handles = [layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(hook(i))
               for i, layer in enumerate(model.model.layers)]
    for w in windows:
        model(w[None])
    for h in handles:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        alpha = math.sqrt(CALIBRATED_MARGIN * LATENT_NORM_EPS / (CALIBRATED_SAFETY**2 * peaks[i]))
        plain = attn.kv_a_layernorm.weight / math.sqrt(LATENT_NORM_EPS)
        attn.kv_a_proj_with_mqa.weight[:rank] *= (plain * alpha)[:, None]
        attn.kv_a_layernorm.weight.fill_(math.sqrt(LATENT_NORM_EPS) / alpha)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(exact).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--kv-lora-rank", type=int, default=64)
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256, help="calibration and evaluation window")
    ap.add_argument("--variants", nargs="+", default=["exact", "calibrated", "native"],
                    choices=["exact", "calibrated", *NATIVE])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    args = ap.parse_args()
    logging.set_verbosity_error()
    torch.manual_seed(0)

    text = args.text.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tmp / "calib.txt"
        calib.write_text(text[:cut], encoding="utf-8")
        opts = ConvertOptions(kv_lora_rank=args.kv_lora_rank, rope_dim=args.rope_dim, calib_text=[calib],
                              dtype="fp32", calib_tokens=args.calib_tokens, calib_seq_len=args.seq_len)
        quiet = lambda m: None  # noqa: E731
        start = time.perf_counter()
        convert(args.model, tmp / "exact", opts, log=quiet)
        folders = {"source": resolve_model(args.model), "exact": tmp / "exact"}
        tokenizer = AutoTokenizer.from_pretrained(tmp / "exact")
        windows = token_windows(tokenizer, text[cut:], args.eval_tokens, args.seq_len, what="evaluation")
        calib_windows = token_windows(tokenizer, text[:cut], args.calib_tokens, args.seq_len, spread=True)
        if "calibrated" in args.variants:
            calibrated(tmp / "exact", tmp / "calibrated", calib_windows)
            folders["calibrated"] = tmp / "calibrated"
        for name, steps in NATIVE.items():
            if name in args.variants:
                convert(args.model, tmp / name, replace(opts, latent="native", native_metric_steps=steps), log=quiet)
                folders[name] = tmp / name
        print(f"model {args.model}, kv_lora_rank {args.kv_lora_rank}, rope dim {args.rope_dim}; calibration on the "
              f"first 90% of {args.text.name} ({args.calib_tokens} tokens), evaluation on the last 10% "
              f"({windows.numel()} tokens, windows of {args.seq_len}); conversions in "
              f"{time.perf_counter() - start:.0f} s\n")
        print("| model | " + " | ".join(["unquantized", *args.schemes]) + " |")
        print("|---|" + "---:|" * (1 + len(args.schemes)))
        for name in ["source", *args.variants]:
            folder = folders[name]
            base = perplexity(load(folder, None), windows)
            cells = [f"{base:.3f}"]
            for scheme in args.schemes:
                ppl = perplexity(load(folder, scheme), windows)
                cells.append(f"{ppl:.3f} ({100 * (ppl / base - 1):+.2f}%)")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
