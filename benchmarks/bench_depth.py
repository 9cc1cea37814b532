"""How a conversion's error compounds over depth on held-out text.

Converts `--model` (statistics from the first 90% of `--text`, fp32 output), then runs the source
and the conversion, each on its own hidden states, over held-out windows of the last 10% and
prints per layer: the attention error measured at conversion (each layer fed the source's hidden
states, from mlakit.json) beside the relative error of the residual stream after that layer when
every earlier layer is converted too (the last after the final norm, as transformers returns it),
and the next-token KL of the final logits.

    python benchmarks/bench_depth.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct --text shakespeare.txt \\
        --kv-lora-rank 128 --calib-tokens 8192
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.core.checkpoint import resolve_model
from mlakit.core.text import DEFAULT_TEXT, token_windows


@torch.no_grad()
def run(folder: Path, windows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states after each layer (the embeddings first) and log-probabilities, per window."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hidden, logp = [], []
    for w in windows:
        out = model(w[None], output_hidden_states=True)
        hidden.append(torch.stack(out.hidden_states)[:, 0])  # (layers + 1, L, D)
        logp.append(F.log_softmax(out.logits[0].float(), -1))
    return [torch.stack(h) for h in zip(*hidden)], torch.stack(logp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--kv-lora-rank", type=int, default=None)
    ap.add_argument("--calib-tokens", type=int, default=ConvertOptions.calib_tokens)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    logging.set_verbosity_error()

    folder = resolve_model(args.model)
    text = args.text.read_text(encoding="utf-8")
    windows = token_windows(AutoTokenizer.from_pretrained(folder), text[int(0.9 * len(text)):], args.eval_tokens,
                            args.seq_len, what="evaluation")
    with tempfile.TemporaryDirectory() as tmp:
        calib, out = Path(tmp) / "calib.txt", Path(tmp) / "out"
        calib.write_text(text[: int(0.9 * len(text))], encoding="utf-8")
        record = convert(args.model, out, ConvertOptions(kv_lora_rank=args.kv_lora_rank, calib_text=[calib],
                                                         calib_tokens=args.calib_tokens, dtype="fp32"),
                         log=lambda m: None)
        src_h, src_lp = run(folder, windows)
        conv_h, conv_lp = run(out, windows)
    kl = (src_lp.exp() * (src_lp - conv_lp)).sum(-1).mean().item()
    shape = record["shape"]
    print(f"model {args.model}, kv_lora_rank {shape['kv_lora_rank']} + rope {shape['qk_rope']}, "
          f"{args.calib_tokens} calibration tokens; held-out: {windows.shape[0]} windows of {args.seq_len} tokens "
          f"of the last 10% of {args.text.name}; final next-token KL {kl:.4f}\n")
    print("| layer | attn err, source inputs (conversion) | residual stream error after the layer, converted inputs |")
    print("|---:|---:|---:|")
    for row, s, c in zip(record["layers"], src_h[1:], conv_h[1:]):
        err = ((c - s).norm() / s.norm()).item()
        print(f"| {row['layer']} | {row['attn_rel_error']:.4f} | {err:.4f} |")


if __name__ == "__main__":
    main()
