"""The device check: conversion, calibration and serving on an accelerator, in a few minutes.

Steps, each timed (wall seconds, peak accelerator memory), each reported PASS, FAIL or SKIP on a
line of its own, all written to a markdown results file:

1. convert the demo (and SmolLM2-135M-Instruct, when present or fetchable) on DEVICE and on the
   CPU, fp32, same settings; compare the two: logits on held-out text, each layer's composed latent
   map kv_b_proj diag(kv_a_layernorm) kv_a_proj_with_mqa[:rank] (independent of the latent basis,
   which eigen-solvers may pick differently), and the largest raw weight difference (reported);
   tolerance COMPARE_TOLERANCE (relative, Frobenius). Each conversion must run every layer's
   factorization (rope step, latent: `convert_attention`) on its own device: the devices of the
   tensors its products and eigensolvers take are counted, with the seconds it took;
2. layer-wise calibration of the demo conversion on DEVICE (tokens/s, peak memory), on
   multi-document rows (the docstrings as one document per paragraph, so that every row packs
   several: the per-document attention runs on DEVICE);
3. distillation of the same on DEVICE, same rows (bf16 autocast on CUDA; tokens/s, peak memory);
4. distillation with the cached top-k teacher on DEVICE (the teacher cache built on DEVICE);
5. `mlakit validate` of the demo conversion on DEVICE: with `--device cuda` both models are placed
   by accelerate (device_map "auto"); then again with `--max-memory` so small that most layers are
   offloaded to CPU memory, which must give the same perplexities and KL (COMPARE_TOLERANCE);
6. when `import vllm` works: the converted demo served by vLLM, prompt log-probabilities compared
   with transformers', unquantized and with vLLM's fp8 weights (and, for comparison, the exact
   latent format with fp8 weights);
7. on a DEVICE other than the CPU, when pytest is installed: the exactness tests' cases on DEVICE
   (tests/test_exact.py, and the MQA conversion of tests/test_convert.py), which the test suite
   runs on every device it sees.

    bash scripts/gpu_check.sh                              # full form, on a GPU
    bash scripts/gpu_check.sh --device cpu --tiny          # reduced form on the CPU (the test suite's)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from mlakit.calibrate.distill import DistillOptions
from mlakit.calibrate.layerwise import LayerwiseOptions
from mlakit.calibrate.run import CalibrateOptions, calibrate
from mlakit.convert import pipeline
from mlakit.convert.pipeline import ConvertOptions, convert
from mlakit.core.checkpoint import CheckpointReader
from mlakit.core.deepseek import attention_names
from mlakit.core.text import DEFAULT_TEXT, token_windows
from mlakit.validate.run import ValidateOptions, validate

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = Path.home() / ".cache" / "mlakit" / "SmolLM2-135M-Instruct"
COMPARE_TOLERANCE = 1e-3
# vLLM serves in bf16: prompt log-probs agree with transformers' fp32 ones to bf16 accuracy.
VLLM_TOLERANCE = 0.1
PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.", "The quick brown fox jumps over the"]


@dataclass(frozen=True)
class Settings:
    calib_tokens: int
    seq_len: int
    calib_train_tokens: int
    layer_steps: int
    eval_tokens: int
    smollm2: bool


FULL = Settings(calib_tokens=16384, seq_len=256, calib_train_tokens=16384, layer_steps=50, eval_tokens=2048,
                smollm2=True)
TINY = Settings(calib_tokens=1024, seq_len=64, calib_train_tokens=512, layer_steps=2, eval_tokens=256, smollm2=False)


class Results:
    """Lines a person reads, printed as they come and written to the results file at the end."""

    def __init__(self, device: str):
        self.device = device
        self.lines: list[str] = []
        self.failed = 0

    def add(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def verdict(self, name: str, ok: bool, detail: str) -> None:
        self.failed += not ok
        self.add(f"- {'PASS' if ok else 'FAIL'} {name}: {detail}")

    @contextlib.contextmanager
    def step(self, name: str):
        """Time a step and report its peak memory; an exception fails the step, not the check."""
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:  # every failure is reported on one line and the check goes on
            self.failed += 1
            first = " ".join(str(exc).split()) or type(exc).__name__
            self.add(f"- FAIL {name}: {type(exc).__name__}: {first[:300]}")
            traceback.print_exc()
            return
        peak = (f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU memory" if cuda else
                f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        self.add(f"- time {name}: {time.perf_counter() - start:.1f} s wall, {peak}")

    def write(self, path: Path, header: list[str]) -> None:
        path.write_text("\n".join([*header, *self.lines, "", f"{self.failed} failure(s)"]) + "\n")


# The factorization's heavy calls: where their tensors are is where it runs.
FACTORIZATION_CALLS = {torch.matmul, torch.Tensor.matmul, torch.einsum, torch.linalg.eigh, torch.linalg.eigvalsh,
                       torch.linalg.solve}  # `a @ b` reaches a mode as Tensor.matmul


class _CallDevices(TorchFunctionMode):
    """Counts the tensors that FACTORIZATION_CALLS take, per device type."""

    def __init__(self, seen: collections.Counter):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args: tuple = (), kwargs: dict | None = None):
        if func in FACTORIZATION_CALLS:
            self.seen.update(a.device.type for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def factorization_devices() -> Iterator[collections.Counter]:
    """A counter that, while open, counts per device type the tensors that every layer's factorization
    (`convert_attention`, as the pipeline calls it) takes into its products and eigensolvers."""
    seen: collections.Counter = collections.Counter()
    original = pipeline.convert_attention

    def watched(*args, **kwargs):
        with _CallDevices(seen):
            return original(*args, **kwargs)

    with mock.patch.object(pipeline, "convert_attention", watched):
        yield seen


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def composed_latent(reader: CheckpointReader, i: int, rank: int) -> torch.Tensor:
    """kv_b_proj diag(kv_a_layernorm) kv_a_proj_with_mqa[:rank]: the same map whatever the latent basis."""
    names = attention_names(i)
    latent = reader.get(names["kv_a_proj_with_mqa"]).double()[:rank]
    return reader.get(names["kv_b_proj"]).double() @ (reader.get(names["kv_a_layernorm"]).double()[:, None] * latent)


@torch.no_grad()
def compare(results: Results, name: str, got: Path, ref: Path, text: str, seq_len: int) -> None:
    """The DEVICE conversion against the CPU one (see the module docstring)."""
    a, b = CheckpointReader(got), CheckpointReader(ref)
    rank = json.loads((ref / "config.json").read_text())["kv_lora_rank"]
    layers = json.loads((ref / "config.json").read_text())["num_hidden_layers"]
    raw = max(relative(a.get(n), b.get(n)) for n in b.names)
    latent = max(relative(composed_latent(a, i, rank), composed_latent(b, i, rank)) for i in range(layers))
    ids = token_windows(AutoTokenizer.from_pretrained(ref), text, seq_len, seq_len, what="comparison")
    logits = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()(ids).logits for f in (got, ref)]
    diff = relative(*logits)
    results.verdict(f"{name} equals the CPU conversion", max(diff, latent) <= COMPARE_TOLERANCE,
                    f"logits {diff:.2e}, composed latent maps {latent:.2e} (tolerance {COMPARE_TOLERANCE:g}); "
                    f"largest raw weight difference {raw:.2e}")


def convert_both(results: Results, name: str, source: str, args: list[str], settings: Settings, device: str,
                 tmp: Path, text: str) -> Path | None:
    """Convert on DEVICE (timed) and on the CPU; compare; return the DEVICE conversion (the CPU one
    when the DEVICE conversion failed, so that the later steps still run)."""
    rank, rope = (int(a) for a in args)
    calib = tmp / "calib.txt"
    cut = int(0.9 * len(text))
    calib.write_text(text[:cut], encoding="utf-8")
    opts = {d: ConvertOptions(kv_lora_rank=rank, rope_dim=rope, calib_text=[calib], calib_tokens=settings.calib_tokens,
                              calib_seq_len=settings.seq_len, dtype="fp32", device=d, latent="native")
            for d in (device, "cpu")}
    out = {d: tmp / f"{name}-{d.replace(':', '')}" for d in opts}
    for d in dict.fromkeys((device, "cpu")):
        record = None
        with (results.step(f"convert {name} on {d} ({settings.calib_tokens} calibration tokens, native latent)"),
              factorization_devices() as seen):
            record = convert(source, out[d], opts[d], force=True, log=lambda m: None)
        if record is not None:
            factorization = sum(row["seconds"]["rope and latent"] for row in record["layers"])
            results.verdict(f"{name}'s factorization on {d}", set(seen) == {torch.device(d).type},
                            f"tensors its products and eigensolvers took, per device: {dict(seen)}; "
                            f"{factorization:.2f} s over all layers")
    done = [f for f in out.values() if (f / "config.json").is_file()]
    if len(done) == len(out):
        with results.step(f"compare {name}"):
            compare(results, name, out[device], out["cpu"], text[cut:], settings.seq_len)
    return done[0] if done else None


def exactness_tests(results: Results, device: str) -> None:
    """The exactness tests' cases on DEVICE (their ids name it), in a pytest run of their own."""
    kind = torch.device(device).type
    if importlib.util.find_spec("pytest") is None:
        results.add(f"- SKIP exactness tests on {kind}: pytest is not installed here")
        return
    with results.step(f"exactness tests on {kind}"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", kind,
                               "tests/test_exact.py", "tests/test_convert.py"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        results.verdict(f"exactness tests on {kind}", proc.returncode == 0, last)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)


def documents(tmp: Path) -> Path:
    """The bundled docstrings as a jsonl file of one document per paragraph: packed rows then hold
    several documents each, which the calibration must keep apart on the device."""
    paragraphs = [p for p in DEFAULT_TEXT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    path = tmp / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    return path


def calibrate_demo(results: Results, converted: Path, settings: Settings, device: str, tmp: Path) -> None:
    runs = [("layerwise", 0), ("distill", 0), ("distill", 64)]
    data = documents(tmp)
    for mode, top_k in runs:
        opts = CalibrateOptions(mode=mode, teacher="demo", data=[str(data)], tokens=settings.calib_train_tokens,
                                eval_tokens=settings.eval_tokens, seq_len=settings.seq_len, batch_size=4, device=device,
                                layerwise=LayerwiseOptions(steps=settings.layer_steps),
                                distill=DistillOptions(checkpoint_dir=tmp / f"ckpt-{mode}-{top_k}", teacher_topk=top_k))
        label = (f"calibrate {mode} on {device}, multi-document rows"
                 + (f" (cached top-{top_k} teacher)" if top_k else "")
                 + (" (bf16 autocast)" if mode == "distill" and device != "cpu" else ""))
        start = time.perf_counter()
        with results.step(label):
            outcome = calibrate(str(converted), tmp / f"calibrated-{mode}-{top_k}", opts, force=True)
            seconds = time.perf_counter() - start
            before, after = outcome.qualities[0][1], outcome.qualities[-1][1]
            results.add(f"- {mode}: {settings.calib_train_tokens / seconds:.0f} tokens/s end to end; held-out "
                        f"perplexity {before.student_ppl:.3f} -> {after.student_ppl:.3f} (teacher "
                        f"{before.teacher_ppl:.3f})")


def validate_demo(results: Results, converted: Path, settings: Settings, device: str, tmp: Path) -> None:
    """Validate on DEVICE as placed by accelerate, then with most layers offloaded to CPU memory: the
    figures must agree."""
    runs = {"placed by accelerate" if device == "cuda" else "loaded whole": None}
    if device == "cuda":
        runs["offloaded by --max-memory"] = {0: "4MiB", "cpu": "64GiB"}
    got = {}
    for label, max_memory in runs.items():
        opts = ValidateOptions(tokens=settings.eval_tokens, seq_len=settings.seq_len, contexts=[settings.seq_len],
                               report=tmp / f"report-{len(got)}", device=device, max_memory=max_memory, new_tokens=8,
                               layer_tokens=settings.seq_len)
        with results.step(f"validate demo on {device}, {label}"):
            got[label] = report = validate("demo", str(converted), opts, log=lambda m: None)
            results.add(f"- {label}: perplexity {report['perplexity']['source']:.3f} -> "
                        f"{report['perplexity']['converted']:.3f}, KL {report['kl']['mean']:.4f}")
    if len(got) == 2:
        a, b = got.values()
        pairs = [(a["perplexity"]["source"], b["perplexity"]["source"]),
                 (a["perplexity"]["converted"], b["perplexity"]["converted"]), (a["kl"]["mean"], b["kl"]["mean"])]
        worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)
        results.verdict("validate offloaded = placed", worst <= COMPARE_TOLERANCE, f"worst relative difference {worst:.2e}")


def exact_demo(results: Results, device: str, tmp: Path, settings: Settings) -> Path | None:
    """The demo in the exact latent format, for vLLM's fp8 comparison."""
    out = tmp / "demo-exact"
    with results.step(f"convert demo on {device} (exact latent)"):
        convert("demo", out, ConvertOptions(kv_lora_rank=64, rope_dim=64, calib_tokens=settings.calib_tokens,
                                            calib_seq_len=settings.seq_len, dtype="fp32", device=device),
                log=lambda m: None)
    return out if (out / "config.json").is_file() else None


def vllm_worker(folder: str, quantization: str | None) -> None:
    """In a subprocess of its own: prompt log-probs from vLLM as JSON on the last stdout line."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, dtype="bfloat16", quantization=quantization, gpu_memory_utilization=0.3,
              enforce_eager=True, max_model_len=512)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=0))
    rows = [[None if lp is None else lp[tok].logprob for tok, lp in zip(o.prompt_token_ids, o.prompt_logprobs)]
            for o in outs]
    print(json.dumps({"ids": [o.prompt_token_ids for o in outs], "logprobs": rows}))


@torch.no_grad()
def vllm_check(results: Results, folder: Path, exact: Path | None) -> None:
    """The native conversion in bf16 and fp8 must match transformers; the exact one in fp8 is
    reported beside it (its latent rows do not survive fp8, see docs/quantization.md)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # absent, or present but unusable here
        results.add(f"- SKIP vLLM: `import vllm` fails here ({type(exc).__name__})")
        return
    runs = [("native", folder, None), ("native", folder, "fp8")] + ([("exact", exact, "fp8")] if exact else [])
    for label, path, quantization in runs:
        name = f"vLLM {quantization or 'bf16'} prompt log-probs of the {label} format"
        with results.step(name):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            proc = subprocess.run([sys.executable, __file__, "--vllm-worker", str(path), quantization or ""],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            diffs = []
            for ids, lps in zip(got["ids"], got["logprobs"]):
                ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                diffs += [abs(lp - ref[t - 1, tok].item()) for t, (tok, lp) in enumerate(zip(ids, lps)) if lp is not None]
            mean = sum(diffs) / len(diffs)
            tolerance = VLLM_TOLERANCE * (4 if quantization else 1)
            detail = (f"mean |difference| {mean:.4f} nats over {len(diffs)} tokens (tolerance {tolerance:g}), "
                      f"max {max(diffs):.4f}")
            if label == "native":
                results.verdict(f"{name} match transformers", mean <= tolerance, detail)
            else:
                results.add(f"- {name} against transformers (expected to differ): {detail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="reduced form: the demo only, a few hundred tokens")
    ap.add_argument("--results", type=Path, default=Path("gpu_check_results.md"))
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="SmolLM2's calibration and comparison text")
    ap.add_argument("--vllm-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_worker:
        vllm_worker(args.vllm_worker[0], args.vllm_worker[1] or None)
        return
    logging.set_verbosity_error()
    settings = TINY if args.tiny else FULL
    results = Results(args.device)
    accel = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "none"
    header = [f"# mlakit device check ({'tiny' if args.tiny else 'full'} form)", "",
              f"device {args.device} ({accel}), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
              f"settings: {settings}", ""]
    print("\n".join(header), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = convert_both(results, "demo", "demo", ["64", "64"], settings, args.device, tmp,
                            DEFAULT_TEXT.read_text(encoding="utf-8"))
        if settings.smollm2:
            smollm2(results, settings, args.device, tmp, args.text)
        if demo is not None:
            calibrate_demo(results, demo, settings, args.device, tmp)
            validate_demo(results, demo, settings, args.device, tmp)
            if args.device.startswith("cuda"):
                vllm_check(results, demo, exact_demo(results, args.device, tmp, settings))
        if args.device != "cpu":
            exactness_tests(results, args.device)
    results.add(f"- total {time.perf_counter() - start:.0f} s")
    results.write(args.results, header)
    print(f"wrote {args.results}")
    sys.exit(1 if results.failed else 0)


def smollm2(results: Results, settings: Settings, device: str, tmp: Path, text_path: Path) -> None:
    """Convert SmolLM2-135M-Instruct (fetched first when missing): calibration on the first 90% of
    the text, comparison on the rest."""
    if not (SMOLLM2 / "config.json").is_file():
        fetch = subprocess.run([sys.executable, str(Path(__file__).with_name("fetch_smollm2.py"))],
                               capture_output=True, text=True)
        if fetch.returncode:
            results.add(f"- SKIP SmolLM2: not in {SMOLLM2} and the fetch failed "
                        f"({(fetch.stderr.strip().splitlines() or ['?'])[-1][:200]})")
            return
    text = text_path.read_text(encoding="utf-8")
    convert_both(results, "SmolLM2-135M", str(SMOLLM2), ["128", "64"], settings, device, tmp, text)


if __name__ == "__main__":
    main()
