"""What the latent's width alone costs: the source with only its values squeezed to r numbers a token.

In the DeepSeek-V3 format every head's value is read from the latent (kv_lora_rank numbers a token);
the rotary key slots carry keys only. So a conversion at kv_lora_rank r keeps at most r numbers of
value information per token, however it treats keys and rope. This benchmark measures that part
alone: each layer's v_proj replaced by its best rank-r map (the top r directions of the values'
output covariance on the conversion's default calibration set, weighted by what o_proj makes of
them: `joint_latent` with no keys), then o_proj refitted as `mlakit convert` refits it (least
squares on the source's attention inputs, teacher-forced, the ridge chosen on the held-out rows);
keys, queries, rope and biases exact. Where this loses more than a target allows, a one-shot
conversion at that kv_lora_rank, which must also fit its no-rope keys into the same latent, is not
expected to reach the target; the rows at the full value width check that nothing else changed
(they equal the source).

Perplexity in fp32 by transformers on the unseen kinds of `bench_unseen.py`:

    python benchmarks/bench_value_rank.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct \\
        --shakespeare shakespeare.txt --sotu sotu.txt --eval-tokens 2048 --ranks 192 128 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_quality import perplexity
from bench_unseen import eval_texts
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from mlakit.convert.factorize import LeastSquares, joint_latent
from mlakit.convert.pipeline import _choose_output, calibration_windows
from mlakit.convert.plan import ConvertOptions
from mlakit.core.checkpoint import resolve_model
from mlakit.core.text import token_windows


def input_moments(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """E[x x^T] (float64) of each layer's attention input over the calibration windows."""
    layers = model.model.layers
    sums = [torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64) for _ in layers]

    def hook(i):
        def grab(module, args, kwargs):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).reshape(-1, sums[i].shape[0])
            sums[i] += x.double().T @ x.double()
        return grab

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for row in windows:
            model(row[None].long())
    finally:
        for h in handles:
            h.remove()
    return [s / windows.numel() for s in sums]


def refit_outputs(model, windows: torch.Tensor, held_out: int, squeezed: list[torch.Tensor]) -> list[torch.Tensor]:
    """o_proj of each layer refitted to the source's attention output from the squeezed values' head
    outputs, both on the source's attention inputs: each row runs as a batch of two whose second item
    takes the first's attention input at every layer and the squeezed v_proj."""
    attn = [layer.self_attn for layer in model.model.layers]
    n = attn[0].o_proj.weight.shape[1]
    fits = [(LeastSquares(n, model.config.hidden_size), LeastSquares(n, model.config.hidden_size)) for _ in attn]
    part = [0]

    def teacher_forced(module, args, kwargs):
        key = "hidden_states" if "hidden_states" in kwargs else None
        x = kwargs[key] if key else args[0]
        x = torch.stack([x[0], x[0]])
        return (args, {**kwargs, key: x}) if key else ((x, *args[1:]), kwargs)

    def v_two_ways(i):
        def forward(module, args, out):
            return torch.stack([out[0], torch.nn.functional.linear(args[0][1], squeezed[i], module.bias)])
        return forward

    def accumulate(i):
        def grab(module, args):
            a = args[0].reshape(2, -1, n)
            fits[i][part[0]].update(a[1], a[0] @ module.weight.T)
        return grab

    handles = [h for i, a in enumerate(attn) for h in (
        a.register_forward_pre_hook(teacher_forced, with_kwargs=True), a.v_proj.register_forward_hook(v_two_ways(i)),
        a.o_proj.register_forward_pre_hook(accumulate(i)))]
    try:
        for r, row in enumerate(windows):
            part[0] = int(r >= len(windows) - held_out)
            model(row[None].long().expand(2, -1))
    finally:
        for h in handles:
            h.remove()
    opts = ConvertOptions()
    return [_choose_output(fit, held, a.o_proj.weight.double(), opts)[0].float() for (fit, held), a in zip(fits, attn)]


def output_metric(o: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """W_o^T W_o summed over the query heads that read each kv head's value (block diagonal)."""
    d = o.shape[1] // heads
    per_head = o.double().view(o.shape[0], heads, d).permute(1, 2, 0)
    per_head = per_head @ per_head.transpose(1, 2)
    group = heads // kv_heads
    return torch.block_diag(*[per_head[g * group:(g + 1) * group].sum(0) for g in range(kv_heads)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--shakespeare", type=Path, default=None)
    ap.add_argument("--sotu", type=Path, default=None)
    ap.add_argument("--ranks", type=int, nargs="+", required=True, help="value ranks (kv_lora_rank) to measure")
    ap.add_argument("--calib-tokens", type=int, default=ConvertOptions.calib_tokens)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    calib = calibration_windows(folder, tokenizer, ConvertOptions(calib_tokens=args.calib_tokens))
    sigmas = input_moments(model, calib.windows[:calib.fit_rows])
    texts = eval_texts(tokenizer, args.shakespeare, args.sotu)
    sets = [token_windows(tokenizer, t, args.eval_tokens, args.seq_len, what="evaluation") for t in texts.values()]
    pairs = [(w, w) for w in sets]
    base = perplexity(model, pairs)
    attn = [layer.self_attn for layer in model.model.layers]
    v_width = attn[0].v_proj.weight.shape[0]
    print(f"model {args.model}: values {kv_heads} kv heads x {v_width // kv_heads} = {v_width} a token; "
          f"calibration {calib.fit_rows} rows of the default set; {args.eval_tokens} tokens of each kind")
    print("source perplexity: " + ", ".join(f"{k} {p:.3f}" for k, p in zip(texts, base)) + "\n")
    print("| value rank | " + " | ".join(f"{k} vs source" for k in texts) + " | worst |")
    print("|---:|" + "---:|" * (len(texts) + 1), flush=True)
    original = [(a.v_proj.weight.detach().clone(), a.o_proj.weight.detach().clone()) for a in attn]
    for rank in args.ranks:
        squeezed = []
        for a, (v, o), sigma in zip(attn, original, sigmas):
            latent = joint_latent(v[:0], v, sigma, min(rank, v_width), v_metric=output_metric(o, heads, kv_heads))
            squeezed.append((latent.v_up @ latent.down).float())
        refits = refit_outputs(model, calib.windows, calib.held_out, squeezed)
        for refit in (False, True):
            for a, (v, o), v_low, o_new in zip(attn, original, squeezed, refits):
                a.v_proj.weight.copy_(v_low)
                a.o_proj.weight.copy_(o_new if refit else o)
            ratios = [p / b - 1 for p, b in zip(perplexity(model, pairs), base)]
            print(f"| {rank}{', o_proj refitted' if refit else ''} | " + " | ".join(f"{100 * r:+.1f}%" for r in ratios)
                  + f" | {100 * max(ratios):+.1f}% |", flush=True)
        for a, (v, o) in zip(attn, original):
            a.v_proj.weight.copy_(v)
            a.o_proj.weight.copy_(o)


if __name__ == "__main__":
    main()
