"""Wall time and peak memory of `mlakit validate` against evaluation tokens and model size.

Each model is converted once; each validation runs in a fresh process with default settings
(seq-len 512, the held-out bundled text, four prompts, caches measured at 1024/4096/32768 tokens
clipped to max_position_embeddings), `--repeat` times, and the fastest run is one table row. On a
shared machine wall time measures the neighbours too; with `--threads 1` the CPU seconds do not.
`demo` is the bundled model; `medium` and `large` are random-weight Llama-shaped models with the
demo's tokenizer.

    python benchmarks/bench_validate.py --models demo medium --tokens 4096 16384 32768 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mlakit.core.guard import DEMO_DIR

SHAPES = {
    "medium": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 2, "kv_lora_rank": 128},
    "large": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
              "num_key_value_heads": 4, "kv_lora_rank": 256},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

CHILD = """
import json, resource, sys, time
from pathlib import Path
import torch
from mlakit.validate.run import ValidateOptions, validate
torch.set_num_threads(int(sys.argv[5]))
t = time.perf_counter()
r = validate(sys.argv[1], sys.argv[2], ValidateOptions(tokens=int(sys.argv[3]), report=Path(sys.argv[4])),
             log=lambda m: None)
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": time.perf_counter() - t, "cpu_s": use.ru_utime + use.ru_stime,
                  "rss_gb": use.ru_maxrss / 2**20, "params": r["source"]["parameters"], **r["timings"]}))
"""


def build(folder: Path, shape: dict) -> None:
    """A random bf16 Llama with head_dim 64 and the demo's vocabulary and tokenizer."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
                      **{k: v for k, v in shape.items() if k != "kv_lora_rank"})
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / name, folder / name)


def run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(res.stdout + res.stderr)
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=["demo", *SHAPES], default=["demo", "medium"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is shown")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads of each validation (1 makes CPU seconds independent of other load)")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, torch threads {args.threads}, validate defaults (seq-len 512, held-out bundled "
          "text)")
    print("| model | parameters | tokens | validate s | source pass s | converted pass s | layer errors s "
          "| CPU s | peak RSS GB | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src, out, rank = "demo", Path(tmp) / "demo-mla", "64"
            if name != "demo":
                src, out, rank = Path(tmp) / name, Path(tmp) / f"{name}-mla", str(SHAPES[name]["kv_lora_rank"])
                build(src, SHAPES[name])
            run("-m", "mlakit", "convert", str(src), str(out), "--kv-lora-rank", rank, "--calib-tokens", "8192")
            for tokens in args.tokens:
                rows = []
                for _ in range(args.repeat):
                    child = run("-c", CHILD, str(src), str(out), str(tokens), str(Path(tmp) / "report"),
                                str(args.threads))
                    rows.append({**json.loads(child.splitlines()[-1]), "load": os.getloadavg()[0]})
                row = min(rows, key=lambda r: r["wall_s"])
                print(f"| {name} | {row['params'] / 1e6:.1f} M | {tokens:,} | {row['wall_s']:.1f} | "
                      f"{row['source_s']:.1f} | {row['converted_s']:.1f} | {row['layer_errors_s']:.1f} | "
                      f"{row['cpu_s']:.0f} | {row['rss_gb']:.2f} | {row['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
