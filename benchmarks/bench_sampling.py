"""Peak resident memory and time of sampling calibration text from a model, as `mlakit convert` does
when no --calib-text is given, against how often freed heap memory is returned to the system.

Each setting runs in a fresh process with an empty sample cache (nothing is read from or written to
the user's), samples one batch of rows, and prints the wall time, the peak resident memory (the
float32 model, mapped from its file or widened from bf16, and what generation allocates), its
anonymous part, the plan's estimate of the conversion's peak (sampling is its largest step when the
model is large), and a hash of the sampled ids (the same for every setting: trimming frees memory
only). `--trim-every 0` never trims during generation. `--toy` samples from a random Qwen2 with the
KV cache and vocabulary of Qwen2.5-1.5B (28 layers, 2 kv heads of 128, vocab 151936) and small
matrices (hidden 256): generation allocates what the real model's does, at a fraction of the compute.

    python benchmarks/bench_sampling.py --toy --trim-every 0 8 --repeat 3
    python benchmarks/bench_sampling.py --model /tmp/qwen-fp32 --trim-every 8
    python benchmarks/bench_sampling.py --model ~/.cache/mlakit/SmolLM2-135M-Instruct --trim-every 8 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 2**30


def status_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.M)}


def child(model: str, seq_len: int, trim_every: int) -> None:
    """Sample BATCH_ROWS rows once and print one JSON line of measurements."""
    from transformers import AutoTokenizer

    from mlakit.convert.plan import ConvertOptions, make_plan
    from mlakit.core import sampling
    from mlakit.core.checkpoint import resolve_model

    folder = resolve_model(model, None)
    rows = sampling.BATCH_ROWS
    plan = make_plan(model, ConvertOptions(calib_tokens=2 * rows * seq_len, calib_seq_len=seq_len, dtype="fp32"))
    sampling.TRIM_EVERY = trim_every or 1 << 30
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base, peak, done = status_kib(), status_kib(), threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            for key, value in status_kib().items():
                peak[key] = max(peak[key], value)

    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()
    ids, _ = sampling.sample_windows(folder, tokenizer, sampling.SampleSettings(seq_len), rows)
    seconds = time.perf_counter() - start
    done.set()
    print(json.dumps({"seconds": seconds, "peak": peak["VmRSS"] * 1024, "anon": (peak["RssAnon"] - base["RssAnon"]) * 1024,
                      "estimate": plan.cost.ram_bytes,
                      "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="folder, hub id or demo")
    ap.add_argument("--toy", action="store_true", help="a random model with Qwen2.5-1.5B's cache and vocabulary")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--trim-every", type=int, nargs="+", default=[8, 0])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each setting (the heap's layout, so the peak, varies)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.model, args.seq_len, args.child)
    if args.toy == bool(args.model):
        ap.error("give --model or --toy")
    with tempfile.TemporaryDirectory() as work:
        model = str(toy(Path(work) / "toy")) if args.toy else args.model
        table(model, "a random model with Qwen2.5-1.5B's cache and vocabulary" if args.toy else args.model, args)


def toy(folder: Path) -> Path:
    """Random float32 weights with Qwen2.5-1.5B's attention and vocabulary shapes, small elsewhere."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench_memory import byte_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    byte_tokenizer(folder)
    return folder


def table(model: str, name: str, args: argparse.Namespace) -> None:
    print(f"{name}, 32 rows of {args.seq_len} tokens, torch threads {os.environ.get('OMP_NUM_THREADS', 'all')}\n")
    print("| trim every (steps) | wall s | peak RSS | of it anonymous, above the start | plan's peak estimate | ids |")
    print("|---|---:|---:|---:|---:|---|")
    for every in [e for e in args.trim_every for _ in range(args.repeat)]:
        with tempfile.TemporaryDirectory() as cache:
            out = subprocess.run([sys.executable, __file__, "--model", model, "--seq-len", str(args.seq_len),
                                  "--child", str(every)], env={**os.environ, "MLAKIT_CACHE": cache},
                                 check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {every or 'never'} | {r['seconds']:.0f} | {r['peak'] / GiB:.2f} GiB | {r['anon'] / GiB:.2f} GiB | "
              f"{r['estimate'] / GiB:.2f} GiB | {r['ids']} |", flush=True)


if __name__ == "__main__":
    main()
