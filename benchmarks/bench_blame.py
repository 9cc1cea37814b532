"""Where a conversion's end-to-end loss comes from, layer by layer, on text it never saw.

Per-layer attention errors (`bench_layers.py`, `mlakit validate`) say how far each layer's
attention is from the source's, not what that costs in perplexity. This benchmark measures the
cost: for each layer i, the perplexity of the source with only layer i's attention replaced by the
conversion's ("alone"), and of the whole conversion with only layer i's attention given back to the
source ("restored"), on the unseen kinds of `bench_unseen.py` (Shakespeare, State of the Union,
Python code, Python docstrings, chat). `--restore A-B` also gives back a range of layers at once.
Every stream runs in float32 through the functional layer forwards that convert, calibrate and
validate use (MLP, norms and head are the source's: convert copies them).

    python benchmarks/bench_blame.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct --converted smol-mla \\
        --shakespeare shakespeare.txt --sotu sotu.txt --eval-tokens 2048 --restore 0-4 25-29
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_unseen import eval_texts
from transformers import AutoTokenizer

from mlakit.calibrate.layers import Student
from mlakit.core.checkpoint import resolve_model
from mlakit.core.families import load_spec
from mlakit.core.forward import row_chunks, source_layer
from mlakit.core.stream import SourceModel
from mlakit.core.text import token_windows

ALL = "all layers converted"


def parse_range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def nll_per_row(model: SourceModel, h: torch.Tensor, ids: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each row."""
    out = []
    for i in range(0, h.shape[0], rows):
        logits = model.logits(h[i:i + rows])[:, :-1]
        out.append(F.cross_entropy(logits.flatten(0, 1), ids[i:i + rows, 1:].flatten(), reduction="none")
                   .view(logits.shape[0], -1).mean(1))
    return torch.cat(out)


# A stream: the layers whose attention it takes from the conversion, and where it branches off
# (layer, stream): before that layer it equals the origin ("source" or another stream), so it starts
# there as a copy instead of running the layers before.
Stream = tuple[set[int], int, str]


def stream_nll(folder: Path, converted: Path, ids: torch.Tensor, streams: dict[str, Stream]) -> dict[str, torch.Tensor]:
    """Per-row NLL of the source ("source") and of each stream, every layer's MLP and norms the source's.
    An origin must come before the streams that branch off it."""
    source = SourceModel.load(folder, ids.shape[1], "cpu")
    student = Student(converted, ids.shape[1], "cpu")
    chunks = row_chunks(ids.shape[0], ids.shape[1], max(source.spec.intermediate, source.spec.hidden))
    hidden = {"source": source.embed(ids)}
    with torch.inference_mode():
        for i in range(source.layers):
            src_layer = source.layer(i)
            layer = student.layer(i, src_layer)
            for name, (_, branch, origin) in streams.items():
                if branch == i:
                    hidden[name] = hidden[origin].clone()
            for name, h in hidden.items():
                for c in chunks:
                    if name != "source" and i in streams[name][0]:
                        h[c] = student.forward_layer(h[c], layer, None)
                    else:
                        h[c] = source_layer(h[c], src_layer, source.spec, source.cos, source.sin)
        return {name: nll_per_row(source, h, ids) for name, h in hidden.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the source")
    ap.add_argument("--converted", type=Path, required=True, help="its conversion (a folder convert or calibrate wrote)")
    ap.add_argument("--shakespeare", type=Path, default=None)
    ap.add_argument("--sotu", type=Path, default=None)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="layers to blame one by one (default: all)")
    ap.add_argument("--restore", nargs="*", default=[], metavar="A-B", help="ranges of layers to give back together")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kinds = {k: token_windows(tokenizer, t, args.eval_tokens, args.seq_len, what="evaluation")
             for k, t in eval_texts(tokenizer, args.shakespeare, args.sotu).items()}
    ids = torch.cat(list(kinds.values()))
    kind_rows = torch.cat([torch.full((len(w),), i) for i, w in enumerate(kinds.values())])
    n = load_spec(folder).layers
    blamed = list(range(n)) if args.layers is None else args.layers
    groups = {f"{r.start}-{r.stop - 1} restored": set(r) for r in map(parse_range, args.restore)}
    streams: dict[str, Stream] = {ALL: (set(range(n)), 0, "source"),
                                  **{f"{i} alone": ({i}, i, "source") for i in blamed},
                                  **{f"{i} restored": (set(range(n)) - {i}, i, ALL) for i in blamed},
                                  **{name: (set(range(n)) - g, min(g), ALL) for name, g in groups.items()}}
    nll = stream_nll(folder, args.converted, ids, streams)
    base = nll["source"]
    names = list(kinds)

    def cells(rows: torch.Tensor) -> list[float]:
        return [math.exp(rows[kind_rows == k].mean() - base[kind_rows == k].mean()) - 1 for k in range(len(names))]

    print("\nsource perplexity: " + ", ".join(f"{k} {math.exp(base[kind_rows == j].mean()):.3f}"
                                               for j, k in enumerate(names)))
    print(f"conversion: {args.converted}; {args.eval_tokens} tokens of each kind in windows of {args.seq_len}\n")
    print("| streams | " + " | ".join(f"{k} vs source" for k in names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for name in streams:
        ratios = cells(nll[name])
        print(f"| {name} | " + " | ".join(f"{100 * r:+.1f}%" for r in ratios)
              + f" | {100 * sum(ratios) / len(ratios):+.1f}% |", flush=True)

if __name__ == "__main__":
    main()
