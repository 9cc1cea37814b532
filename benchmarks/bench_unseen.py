"""Quality on text the conversion never saw: perplexity of conversions against the source on several
kinds of text, none of which is calibration text.

Kinds (each skipped when its source is absent):
- Shakespeare, State of the Union: the last 10% of the public-domain files given by --shakespeare
  and --sotu (not shipped with mlakit);
- Python code: the source of EVAL_MODULES from this interpreter's standard library;
- Python docstrings: the last 10% of the bundled demo/docstrings.txt (the calibration text of
  mlakit before 0.2, so in domain for configs that calibrate on it);
- chat: conversations rendered with the model's chat template (skipped without one), a question
  on a topic of Python's language reference answered by the reference's own text
  (pydoc_data.topics).
Perplexity in fp32 by transformers itself, on --eval-tokens of each kind in windows of --seq-len;
conversions written in fp32 so that the table shows approximation error, not rounding.

A config is NAME or NAME:KEY=VALUE,KEY=VALUE with ConvertOptions fields (calib_text takes paths
joined by +); NAME alone is mlakit's defaults. Each row gives the conversion's wall time, generation
of calibration text included unless it came from the cache (then marked).

    python benchmarks/bench_unseen.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct \\
        --shakespeare shakespeare.txt --sotu sotu.txt --ranks 128 \\
        --config defaults --config "docstrings:calib_text=demo/docstrings.txt"

With --folder NAME=PATH (repeatable) it evaluates existing conversions of --model too, and without
--config only those. --by-position adds a table of where in the window the loss is: perplexity
against the source over all kinds together, per range of token positions (a conversion calibrated
or distilled on windows shorter than the evaluation's may lose more past their length).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch
from bench_quality import nll_perplexity, token_nll
from transformers import AutoTokenizer
from transformers.utils import logging

from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.core.checkpoint import read_json, resolve_model
from mlakit.core.families import load_spec
from mlakit.core.text import DEFAULT_TEXT, token_windows
from mlakit.validate.metrics import by_position as position_perplexity

EVAL_MODULES = ("argparse", "difflib", "fractions", "inspect", "pathlib", "statistics", "textwrap", "typing")
def python_code() -> str:
    return "\n\n".join(inspect.getsource(__import__(m)) for m in EVAL_MODULES)


def chat_transcript(tokenizer) -> str | None:
    """Conversations about Python's language reference, rendered by the model's chat template."""
    if not tokenizer.chat_template:
        return None
    from pydoc_data.topics import topics

    chats = []
    for name in sorted(topics):
        answer = topics[name].strip()[:3000]
        messages = [{"role": "user", "content": f"How does `{name}` work in Python?"},
                    {"role": "assistant", "content": answer}]
        chats.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return "".join(chats)


def tail(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return text[int(0.9 * len(text)):]


def eval_texts(tokenizer, shakespeare: Path | None, sotu: Path | None) -> dict[str, str]:
    texts = {"Shakespeare": tail(shakespeare), "State of the Union": tail(sotu), "Python code": python_code(),
             "Python docstrings": tail(DEFAULT_TEXT), "chat": chat_transcript(tokenizer)}
    return {k: v for k, v in texts.items() if v}


def parse_config(text: str) -> tuple[str, dict]:
    """NAME[:KEY=VALUE,...] -> (NAME, ConvertOptions overrides)."""
    name, _, rest = text.partition(":")
    known = {f.name for f in fields(ConvertOptions)}
    kw = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"unknown ConvertOptions field {key}")
        if key == "calib_text":
            kw[key] = [Path(p).expanduser() for p in value.split("+")]
        else:
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value
    return name, kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--shakespeare", type=Path, default=None)
    ap.add_argument("--sotu", type=Path, default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=[None])
    ap.add_argument("--config", action="append", default=None, help="NAME[:KEY=VALUE,...] (repeatable)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--folder", action="append", default=[], metavar="NAME=PATH",
                    help="also evaluate an existing conversion of --model (e.g. one `mlakit calibrate` wrote)")
    ap.add_argument("--by-position", action="store_true", help="also tabulate the loss by position in the window")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    folder = resolve_model(args.model)
    spec = load_spec(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = eval_texts(tokenizer, args.shakespeare, args.sotu)
    sets = {k: token_windows(tokenizer, t, args.eval_tokens, args.seq_len, what="evaluation") for k, t in texts.items()}
    pairs = [(w, w) for w in sets.values()]
    base_nll = token_nll(folder, pairs)
    base = [nll_perplexity(n) for n in base_nll]
    by_position: dict[str, list[dict]] = {}
    print(f"model {args.model}: {spec.layers} layers, {spec.heads} q / {spec.kv_heads} kv heads of {spec.head_dim}; "
          f"evaluation: {args.eval_tokens} tokens of each kind in windows of {args.seq_len}")
    print("source perplexity: " + ", ".join(f"{k} {p:.3f}" for k, p in zip(sets, base)) + "\n")
    print("| config | kv_lora_rank + rope | cache vs source | convert s | "
          + " | ".join(f"{k} vs source" for k in sets) + " | worst |")
    print("|---|---|---:|---:|" + "---:|" * (len(sets) + 1), flush=True)
    src_cache = spec.kv_elements_per_token_layer()

    def row(name: str, out: Path, seconds: str) -> None:
        nll = token_nll(out, pairs)
        shape = read_json(out / "mlakit.json")["shape"]
        share = 100 * (shape["kv_lora_rank"] + shape["qk_rope"]) / src_cache
        ratios = [nll_perplexity(n) / b - 1 for n, b in zip(nll, base)]
        by_position[f"{name} ({shape['kv_lora_rank']} + {shape['qk_rope']})"] = position_perplexity(
            torch.cat(base_nll), torch.cat(nll))  # the windows of every kind together
        cells = " | ".join(f"{100 * r:+.1f}%" for r in ratios)
        print(f"| {name} | {shape['kv_lora_rank']} + {shape['qk_rope']} | {share:.0f}% | {seconds} | {cells} | "
              f"{100 * max(ratios):+.1f}% |", flush=True)

    for item in args.folder:
        name, _, path = item.partition("=")
        row(name, Path(path).expanduser(), "-")
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks if args.config or not args.folder else []:
            for name, kw in map(parse_config, args.config or ["defaults"]):
                opts = ConvertOptions(**{"kv_lora_rank": rank, "dtype": "fp32", **kw})
                out = Path(tmp) / "out"
                start = time.perf_counter()
                record = convert(args.model, out, opts, force=True, log=lambda m: None)
                seconds = time.perf_counter() - start
                cached = any(s.get("cached") for s in record["calibration"]["sources"])
                row(name, out, f"{seconds:.0f}{' (cached text)' if cached else ''}")
    if args.by_position and by_position:
        print("\nperplexity vs source over all kinds, by the tokens of context before the predicted one:\n")
        print("| config | " + " | ".join(f"{r['context'][0]}-{r['context'][1]}" for r in next(iter(by_position.values())))
              + " |")
        print("|---|" + "---:|" * len(next(iter(by_position.values()))))
        for name, rows in by_position.items():
            print(f"| {name} | " + " | ".join(f"{100 * (r['converted'] / r['source'] - 1):+.1f}%" for r in rows) + " |")


if __name__ == "__main__":
    main()
