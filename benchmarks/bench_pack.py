"""Peak resident memory of reading and packing calibration data, above what the imports take.

Writes a jsonl file of the bundled docstrings, one paragraph a document, repeated until it holds
about --tokens tokens of the demo tokenizer, then packs it as `mlakit calibrate` does:

    nice -n 19 python benchmarks/bench_pack.py --tokens 8000000 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from mlakit.calibrate.data import load_documents, pack
from mlakit.core.guard import DEMO_DIR
from mlakit.core.text import DEFAULT_TEXT


def status_kib(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS now, VmHWM the peak), in KiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def write_data(path: Path, tokenizer, tokens: int) -> int:
    """Paragraphs of the docstrings as jsonl documents, repeated until about `tokens` tokens; returns
    the number of documents."""
    paragraphs = [p for p in DEFAULT_TEXT.read_text().split("\n\n") if p.strip()]
    per_pass = sum(len(ids) for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"])
    passes = max(1, round(tokens / per_pass))
    with path.open("w") as out:
        for _ in range(passes):
            out.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    return passes * len(paragraphs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8_000_000)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        data = Path(tmp) / "data.jsonl"
        documents = write_data(data, tokenizer, args.tokens)
        Path("/proc/self/clear_refs").write_text("5")  # the peak so far is reset to what is resident now
        base = status_kib("VmRSS")
        start = time.perf_counter()
        docs = load_documents([str(data)])
        scratch = Path(tmp) / "packed"
        scratch.mkdir()
        packed = pack(tokenizer, docs, args.seq_len, scratch)
        seconds = time.perf_counter() - start
        print(f"{packed.tokens} tokens packed ({documents} documents, {data.stat().st_size / 2**20:.0f} MiB of jsonl, "
              f"rows of {args.seq_len}) in {seconds:.0f} s: peak resident memory "
              f"{(status_kib('VmHWM') - base) / 1024:.0f} MiB above the {base / 1024:.0f} MiB after the imports")


if __name__ == "__main__":
    main()
