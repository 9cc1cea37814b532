"""`mlakit validate`: the source, then the converted model, on the same tokens; then the report.

Everything that can be refused (a folder that is not MLA or fails check, different tokenizers,
too little text, an unwritable report folder) is refused before either model is loaded. Only one
model is in memory at a time: the source's log-probabilities go to a temporary folder, and the
converted model is scored against them. The per-layer attention errors come last, from the layer
stream (`core/stream.py`): one layer of each model at a time.
"""

from __future__ import annotations

import gc
import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import convert_file_size_to_int
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mlakit.core.checkpoint import CheckpointReader, read_json, resolve_model
from mlakit.core.deepseek import effective_config, mla_shape
from mlakit.core.errors import MlakitError
from mlakit.core.families import load_spec
from mlakit.core.guard import check_output, check_protected
from mlakit.core.stream import SourceModel
from mlakit.core.text import Corpus, load_corpus, token_windows
from mlakit.validate import cache, metrics, weights
from mlakit.validate.check import require_mla
from mlakit.validate.report import REPORT_JSON, REPORT_TARGET, write_report

# The demo trains on the first 90% of the bundled text, so by default validation reads the rest.
HELD_OUT_FRACTION = 0.1
DEFAULT_PROMPTS = ("Return a new list containing", "The default value of this parameter is",
                   "If the file does not exist,", "This module provides functions for")
# Float32 logits of one forward batch stay under this many bytes.
BATCH_LOGIT_BYTES = 2**26


@dataclass
class ValidateOptions:
    """Every knob of a validation; the CLI fills it from flags."""

    texts: list[Path] | None = None
    tokens: int = 32768
    seq_len: int = 512
    prompts: Path | None = None
    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 32768])
    report: Path | None = None
    device: str = "auto"
    max_memory: dict[int | str, str] | None = None
    new_tokens: int = 32
    layer_tokens: int = 2048


@dataclass
class Pass:
    """What one model's pass yields."""

    params: int
    dtype: torch.dtype
    max_positions: int
    cache_bytes: dict[int, int]
    rotary: metrics.Rotary
    generations: list[list[int]]
    seconds: float
    scores: list[metrics.TokenScores] = field(default_factory=list)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MlakitError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MlakitError(f"--device {name}: no CUDA device is available; use --device cpu")
    return device


def parse_max_memory(text: str) -> dict[int | str, str]:
    """--max-memory 0=70GiB,1=70GiB,cpu=200GiB as accelerate's max_memory: GPU index or cpu -> size."""
    usage = f"--max-memory {text}: give DEVICE=SIZE pairs separated by commas, e.g. 0=70GiB,1=70GiB,cpu=200GiB"
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, size = part.partition("=")
        key = key.strip()
        if not (key.isdigit() or key == "cpu"):
            raise MlakitError(usage)
        try:
            convert_file_size_to_int(size.strip())
        except ValueError as exc:
            raise MlakitError(usage) from exc
        out[int(key) if key.isdigit() else key] = size.strip()
    if not out:
        raise MlakitError(usage)
    return out


def load_kwargs(device: torch.device, max_memory: dict[int | str, str] | None = None) -> dict:
    """from_pretrained's arguments for one model. On CUDA accelerate places it as it loads, so that a
    model larger than one GPU never has to fit on one: over every visible GPU (within `max_memory`,
    the rest in CPU memory) for `cuda`, whole on the GPU named by `cuda:N`. Elsewhere it is loaded
    on the CPU and moved."""
    if max_memory and (device.type != "cuda" or device.index is not None):
        raise MlakitError(f"--max-memory spreads a model over the GPUs of --device cuda; it has no use with {device}")
    if device.type != "cuda":
        return {"dtype": "auto"}
    if device.index is not None:
        return {"dtype": "auto", "device_map": {"": device.index}}
    return {"dtype": "auto", "device_map": "auto", **({"max_memory": max_memory} if max_memory else {})}


def _tokenizer(folder: Path, name: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizer loading raises many types
        raise MlakitError(f"{name}: cannot load the tokenizer ({exc})") from exc


def same_tokenizer(src: Path, conv: Path, names: tuple[str, str], sample: str) -> PreTrainedTokenizerBase:
    """The source's tokenizer, once the converted model's is known to tokenize identically."""
    a, b = _tokenizer(src, names[0]), _tokenizer(conv, names[1])
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))
        raise MlakitError(f"the tokenizers of {names[0]} and {names[1]} differ ({len(va)} and {len(vb)} entries, "
                          f"first difference {diff[0][0]!r}); validate needs both models on the same tokens")
    if a(sample)["input_ids"] != b(sample)["input_ids"]:
        raise MlakitError(f"the tokenizers of {names[0]} and {names[1]} split the evaluation text differently; "
                          "validate needs both models on the same tokens")
    return a


def evaluation_text(paths: list[Path] | None) -> Corpus:
    """The user's files, or the part of the bundled text the demo never trained on."""
    corpus = load_corpus(paths)
    if paths:
        return corpus
    tail = corpus.text[int(len(corpus.text) * (1 - HELD_OUT_FRACTION)):]
    name = f"{corpus.name}, held-out last {HELD_OUT_FRACTION:.0%}"
    return Corpus(tail, name, hashlib.sha256(tail.encode()).hexdigest())


def parse_contexts(text: str) -> list[int]:
    """--contexts 1024,4096,32768 as a list of positive token counts."""
    try:
        contexts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise MlakitError(f"--contexts {text}: give token counts separated by commas, e.g. 1024,4096") from exc
    if not contexts or min(contexts) < 1:
        raise MlakitError(f"--contexts {text}: give positive token counts separated by commas, e.g. 1024,4096")
    return contexts


def read_prompts(path: Path | None) -> list[str]:
    """One prompt per non-empty line, or the built-in ones."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MlakitError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    if not prompts:
        raise MlakitError(f"{path}: no prompts (one per line)")
    return prompts


def default_report(converted: str, folder: Path) -> Path:
    """Inside a local CONVERTED folder, where push finds it; beside the working folder for hub ids."""
    return folder / "report" if Path(converted).expanduser().exists() else Path(f"{converted.split('/')[-1]}-report")


def check_report_target(out: Path, inputs: list[Path]) -> None:
    """Refuse a folder that is or holds a model read (inside CONVERTED is its default place), an unwritable
    place, or an existing folder that is not an earlier report (it would be replaced)."""
    check_protected(out, inputs, "--report", nest_ok=True)
    check_output(out, force=True, marker=REPORT_JSON, what=REPORT_TARGET)


def _load(folder: Path, name: str, device: torch.device, max_memory: dict[int | str, str] | None) -> PreTrainedModel:
    kwargs = load_kwargs(device, max_memory)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as exc:  # loading raises many types
        raise MlakitError(f"{name}: transformers cannot load it ({type(exc).__name__}: {exc})") from exc
    return (model if "device_map" in kwargs else model.to(device)).eval()


def run_pass(folder: Path, name: str, windows: torch.Tensor, tmp: Path, opts: ValidateOptions, device: torch.device,
             tokenizer: PreTrainedTokenizerBase, prompts: list[str], contexts: list[int], is_source: bool) -> Pass:
    """Load one model, run it over the windows (saving the source's reference, scoring the
    converted model against it), generate, measure its cache, and free it."""
    start = time.perf_counter()
    model = _load(folder, name, device, opts.max_memory)
    vocab = model.config.vocab_size
    batch = max(1, BATCH_LOGIT_BYTES // (opts.seq_len * vocab * 4))
    top_k = metrics.keep_top_k(windows.numel(), vocab)
    scores = []
    with torch.inference_mode():
        for b, chunk in enumerate(windows.split(batch)):
            out = model(input_ids=chunk.to(model.device))
            x = chunk.to(out.logits.device)  # under a device_map, the last layer's device
            if is_source:
                torch.save(vars(metrics.reference(out.logits, x, top_k)), tmp / f"ref-{b}.pt")
            else:
                ref = metrics.Reference(**torch.load(tmp / f"ref-{b}.pt", map_location=x.device, weights_only=True))
                scores.append(metrics.compare(ref, out.logits, x))
            del out
    result = Pass(
        params=model.num_parameters(),
        dtype=model.dtype,
        max_positions=model.config.max_position_embeddings,
        cache_bytes=cache.measure(model, contexts, chunk=opts.seq_len),
        rotary=metrics.Rotary.of(model),
        generations=metrics.greedy(model, tokenizer, prompts, opts.new_tokens),
        seconds=0.0,
        scores=scores,
    )
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - start
    return result


def validate(source: str, converted: str, opts: ValidateOptions, log: Callable[[str], None] = print) -> dict:
    """Compare CONVERTED with SOURCE and write the report folder; return report.json's content."""
    start = time.perf_counter()
    device = _device(opts.device)
    load_kwargs(device, opts.max_memory)  # refuses --max-memory without --device cuda before anything is read
    if opts.seq_len < 2 or opts.tokens < opts.seq_len:
        raise MlakitError("--tokens must be at least --seq-len, which must be at least 2")
    src_dir, conv_dir = resolve_model(source), resolve_model(converted)
    out = (opts.report or default_report(converted, conv_dir)).expanduser().resolve()
    check_report_target(out, [src_dir, conv_dir])
    checked = require_mla(conv_dir, converted)
    spec = load_spec(src_dir)
    conv_cfg = effective_config(read_json(conv_dir / "config.json"))
    if conv_cfg["vocab_size"] != spec.vocab:
        raise MlakitError(f"vocab sizes differ ({source} {spec.vocab}, {converted} {conv_cfg['vocab_size']}); "
                          "validate compares the two models' distributions token by token")
    max_positions = min(spec.max_positions, conv_cfg["max_position_embeddings"])
    if opts.seq_len > max_positions:
        raise MlakitError(f"--seq-len {opts.seq_len} is longer than max_position_embeddings {max_positions}")
    corpus = evaluation_text(opts.texts)
    tokenizer = same_tokenizer(src_dir, conv_dir, (source, converted), corpus.text[:4000])
    windows = token_windows(tokenizer, corpus.text, opts.tokens, opts.seq_len, what="evaluation")
    if windows.shape[0] < opts.tokens // opts.seq_len:
        raise MlakitError(f"the evaluation text ({corpus.name}) holds {windows.numel()} tokens in windows of "
                          f"{opts.seq_len}, fewer than --tokens {opts.tokens}; give more text or lower --tokens")
    prompts = read_prompts(opts.prompts)
    contexts = sorted({min(c, max_positions) for c in opts.contexts})
    common = dict(windows=windows, opts=opts, device=device, tokenizer=tokenizer, prompts=prompts, contexts=contexts)
    with tempfile.TemporaryDirectory(prefix="mlakit-validate-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"source: {windows.numel()} tokens, {len(prompts)} prompts, cache at {contexts} tokens")
        src = run_pass(src_dir, source, tmp=tmp, is_source=True, **common)
        log(f"converted: the same, scored against the source ({src.seconds:.1f} s for the source)")
        conv = run_pass(conv_dir, converted, tmp=tmp, is_source=False, **common)
        log("per-layer attention error")
        layer_start = time.perf_counter()
        errors = metrics.attention_errors(
            SourceModel(spec, CheckpointReader(src_dir), opts.seq_len, device),
            windows[:max(1, opts.layer_tokens // opts.seq_len)], CheckpointReader(conv_dir),
            mla_shape(conv_cfg), conv_cfg["rms_norm_eps"], conv.rotary)
        layer_seconds = time.perf_counter() - layer_start
    conversion = read_json(conv_dir / "mlakit.json") if (conv_dir / "mlakit.json").is_file() else None
    report = {
        "source": _model_entry(source, src, src_dir),
        "converted": _model_entry(converted, conv, conv_dir),
        "text": {"name": corpus.name, "sha256": corpus.sha256, "tokens": windows.numel(), "seq_len": opts.seq_len,
                 "layer_tokens": min(windows.shape[0], max(1, opts.layer_tokens // opts.seq_len)) * opts.seq_len,
                 "kl_reference": "full vocabulary" if metrics.keep_top_k(windows.numel(), spec.vocab) is None
                 else f"source top-{metrics.TOP_K} plus the rest as one bucket (a lower bound)"},
        **metrics.summarize(conv.scores, opts.seq_len),
        "kv_cache": _kv_cache(src, conv, src_dir, conv_dir, max_positions),
        "parameters": weights.breakdown(spec, conv_cfg, src.params, conv.params,
                                        ((conversion or {}).get("factorization") or {}).get("value_dims")),
        "layers": [{"layer": i, "attn_rel_error": e} for i, e in enumerate(errors)],
        "generation": [
            {"prompt": p, "diverges_at": metrics.divergence(a, b),
             "source": tokenizer.decode(a, skip_special_tokens=True),
             "converted": tokenizer.decode(b, skip_special_tokens=True)}
            for p, a, b in zip(prompts, src.generations, conv.generations)
        ],
        "check": checked.as_dicts(),
        "engines": checked.verdicts(),
        "conversion": conversion,
        "timings": {"source_s": src.seconds, "converted_s": conv.seconds, "layer_errors_s": layer_seconds,
                    "total_s": time.perf_counter() - start},
    }
    write_report(out, report)
    log(f"report written to {out}")
    return report


def _model_entry(name: str, run: Pass, folder: Path) -> dict:
    return {"id": name, "folder": str(folder), "parameters": run.params, "dtype": str(run.dtype).removeprefix("torch."),
            "max_position_embeddings": run.max_positions}


def _kv_cache(src: Pass, conv: Pass, src_dir: Path, conv_dir: Path, max_positions: int) -> dict:
    """Measured bytes at each length next to the formula; per-token numbers from the longest measurement."""
    src_formula = cache.formula_bytes_per_token(src_dir, src.dtype)
    conv_formula = cache.formula_bytes_per_token(conv_dir, conv.dtype)
    rows = [{"context": n, "source_bytes": src.cache_bytes[n], "converted_bytes": conv.cache_bytes[n],
             "source_formula_bytes": src_formula * n, "converted_formula_bytes": conv_formula * n}
            for n in sorted(src.cache_bytes)]
    longest = rows[-1]
    weights_bytes = {"source": src.params * src.dtype.itemsize, "converted": conv.params * conv.dtype.itemsize}
    per_token = {side: longest[f"{side}_bytes"] / longest["context"] for side in weights_bytes}
    return {
        "source_bytes_per_token": per_token["source"],
        "converted_bytes_per_token": per_token["converted"],
        "source_formula_bytes_per_token": src_formula,
        "converted_formula_bytes_per_token": conv_formula,
        "reduction_percent": 100 * (1 - longest["converted_bytes"] / longest["source_bytes"]),
        "measured_matches": all(r["source_bytes"] == r["source_formula_bytes"]
                                and r["converted_bytes"] == r["converted_formula_bytes"] for r in rows),
        "measured": rows,
        "max_position_embeddings": max_positions,
        "weights_bytes": weights_bytes,
        "break_even_tokens": weights.break_even_tokens(weights_bytes, per_token),
    }
