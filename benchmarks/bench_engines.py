"""llama.cpp against transformers: perplexity and greedy text of a source and of its conversion.

Builds llama.cpp from the source bundled in llama-cpp-python's PyPI sdist (downloaded with pip
unless --sdist is given; a CPU build of llama-perplexity and llama-simple, cached and reused),
converts each model folder to GGUF with that release's convert_hf_to_gguf.py at every --outtypes,
and runs llama-perplexity on the last 10% of --text (chunks of --ctx tokens, second half of each
scored) and llama-simple's greedy continuation of a prompt taken from the same text. transformers
(fp32) scores the same chunks the same way and continues the same prompt. No GGUF metadata
override is passed: a model that llama.cpp does not load shows the loader's error.

    python benchmarks/bench_engines.py --source ~/.cache/mlakit/SmolLM2-135M-Instruct \\
        --converted ./smol-mla --text shakespeare.txt
    python benchmarks/bench_engines.py --converted ./demo-mla --sdist llama_cpp_python-0.3.36.tar.gz
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlakit.core.checkpoint import resolve_model
from mlakit.validate.metrics import greedy

TARGETS = ("llama-perplexity", "llama-simple")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON")
CACHE = Path.home() / ".cache" / "mlakit" / "llama.cpp"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def last_error(proc: subprocess.CompletedProcess) -> str:
    """The line of a failed tool's output that says why."""
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    flagged = [line for line in lines if re.search(r"error|assert|exception|key not found", line, re.I)]
    return (flagged or lines or [f"exit status {proc.returncode}"])[-1][:160]


def build_llama_cpp(sdist: Path | None, cache: Path, jobs: int) -> tuple[Path, Path]:
    """(llama.cpp source folder, folder of the built tools) from llama-cpp-python's sdist."""
    cache.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        found = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "llama-cpp-python", "-d", str(cache)], check=True)
            found = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
        sdist = found[-1]
    name = sdist.name.removesuffix(".tar.gz")
    src = cache / name / "vendor" / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    build = cache / f"build-{name.rsplit('-', 1)[1]}"
    if not all((build / "bin" / t).is_file() for t in TARGETS):
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True)
        subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS], check=True)
    return src, build / "bin"


def chunk_windows(tokenizer, text: str, ctx: int, chunks: int) -> torch.Tensor:
    """llama-perplexity's chunks: the whole text tokenized once (with BOS when the vocabulary adds
    one), cut into `ctx`-token chunks whose first token becomes BOS when it does; one chunk of text
    is left for llama-perplexity to run past the last one scored."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    n = min(chunks, len(ids) // ctx - 1)
    windows = torch.tensor(ids[: n * ctx]).view(n, ctx)
    if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        windows[:, 0] = tokenizer.bos_token_id
    return windows


@torch.no_grad()
def transformers_side(folder: Path, windows: torch.Tensor, prompt: str, new_tokens: int) -> tuple[float, str]:
    """Perplexity over the second half of each chunk, as llama-perplexity scores it, and the greedy text."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    first = windows.shape[1] // 2
    nll = []
    for w in windows:
        logits = model(w[None]).logits[0, first:-1]
        nll.append(F.cross_entropy(logits.float(), w[first + 1:], reduction="none"))
    text = tokenizer.decode(greedy(model, tokenizer, [prompt], new_tokens)[0], skip_special_tokens=True)
    return math.exp(torch.cat(nll).mean().item()), text


# Runs convert_hf_to_gguf.py, naming the pre-tokenizer when the script does not know the tokenizer's hash.
CONVERT_WITH_PRE = """
import runpy, sys
script, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, script.rsplit("/", 1)[0])
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def to_gguf(src: Path, folder: Path, outtype: str, out: Path, pre: str | None) -> str | None:
    """Convert with llama.cpp's own script; the reason when it fails."""
    script = str(src / "convert_hf_to_gguf.py")
    cmd = [sys.executable, "-c", CONVERT_WITH_PRE, script, pre] if pre else [sys.executable, script]
    proc = run([*cmd, str(folder), "--outtype", outtype, "--outfile", str(out)])
    return None if proc.returncode == 0 else last_error(proc)


def llama_side(bins: Path, gguf: Path, text_file: Path, ctx: int, chunks: int, prompt: str, new_tokens: int,
               threads: int) -> tuple[float | str, str]:
    """llama-perplexity's perplexity over the first `chunks` chunks (or why it failed) and
    llama-simple's greedy continuation. llama-perplexity logs from a thread that can lose its last
    lines at exit, so it runs one chunk more and its running value after `chunks` chunks is read."""
    proc = run([str(bins / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx),
                "--chunks", str(chunks + 1), "-t", str(threads), "-b", str(ctx)])
    found = re.search(rf"\[{chunks}\]([0-9.]+)", proc.stderr + proc.stdout)
    ppl: float | str = float(found.group(1)) if found else last_error(proc)
    gen = run([str(bins / "llama-simple"), "-m", str(gguf), "-n", str(new_tokens), prompt])
    at = gen.stdout.find(prompt)  # llama-simple echoes the prompt (and any BOS piece) first
    return ppl, gen.stdout[at + len(prompt):].rstrip("\n") if gen.returncode == 0 and at >= 0 else ""


def same_text(a: str, b: str) -> str:
    """'identical', or where two continuations part."""
    if a.strip() == b.strip():
        return "identical"
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differs after {i} characters"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="source model folder (optional)")
    ap.add_argument("--converted", action="append", default=[], help="converted folder(s) (repeatable)")
    ap.add_argument("--text", type=Path, required=True, help="evaluation text; its last 10%% is used")
    ap.add_argument("--outtypes", nargs="+", default=["f32", "bf16", "f16", "q8_0"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python sdist (default: pip download into the cache)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pre-tokenizer", help="tokenizer.ggml.pre to write when convert_hf_to_gguf.py does not know "
                    "the tokenizer's hash (gpt-2 for the bundled demo, whose tokenizer.json declares GPT-2's "
                    "byte-level pre-tokenizer)")
    args = ap.parse_args()

    src, bins = build_llama_cpp(args.sdist, args.cache, args.jobs)
    text = args.text.read_text(encoding="utf-8")
    held_out = text[int(0.9 * len(text)):]
    prompt = " ".join(held_out[held_out.find("\n") + 1:][:400].split()[:24])
    models = ([("source", args.source)] if args.source else []) + [("converted", c) for c in args.converted]
    print(f"llama.cpp from {src.parent.parent.name}; last 10% of {args.text.name}, {args.chunks} chunks of "
          f"{args.ctx} tokens (second half of each scored); greedy {args.new_tokens} tokens after: {prompt!r}\n")
    print("| model | GGUF type | llama.cpp ppl | transformers fp32 ppl | difference | greedy text vs transformers |")
    print("|---|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "held_out.txt"
        text_file.write_text(held_out, encoding="utf-8")
        for role, name in models:
            folder = resolve_model(name)
            windows = chunk_windows(AutoTokenizer.from_pretrained(folder), held_out, args.ctx, args.chunks)
            ref_ppl, ref_text = transformers_side(folder, windows, prompt, args.new_tokens)
            label = f"{folder.name} ({role})"
            for outtype in args.outtypes:
                gguf = Path(tmp) / f"{role}-{outtype}.gguf"
                failed = to_gguf(src, folder, outtype, gguf, args.pre_tokenizer)
                if failed:
                    print(f"| {label} | {outtype} | GGUF conversion fails: {failed} | {ref_ppl:.4f} | | |", flush=True)
                    continue
                ppl, gen = llama_side(bins, gguf, text_file, args.ctx, len(windows), prompt, args.new_tokens,
                                      args.threads)
                gguf.unlink()
                if isinstance(ppl, str):
                    print(f"| {label} | {outtype} | fails: {ppl} | {ref_ppl:.4f} | | |", flush=True)
                    continue
                print(f"| {label} | {outtype} | {ppl:.4f} | {ref_ppl:.4f} | {100 * (ppl / ref_ppl - 1):+.3f}% | "
                      f"{same_text(gen, ref_text)} |", flush=True)


if __name__ == "__main__":
    main()
