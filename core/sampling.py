"""Calibration text sampled from the source model itself, so that a conversion needs no data.

A conversion fits each layer to what the layer sees. Sampled at temperature 1, the model's own
text has the statistics of what the model does (its languages, its domains, its chat format),
where any fixed corpus stands for one domain only. Instruct models are prompted through their
chat template with short neutral requests of many kinds; models without a template continue the
same requests as plain text. Samples are cached per model and settings, so a second conversion
of the same model reuses them.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mlakit.core.checkpoint import CheckpointReader
from mlakit.core.guard import disk_error
from mlakit.core.precision import run_dtype

# Short requests of many kinds (stories, explanations, dialogue, news, code, math, other languages):
# they only start each sample; the model writes the rest. Sample i starts from PROMPTS[i % len].
PROMPTS = (
    "Tell me a story.",
    "Explain something you know well.",
    "Write a Python function and explain it.",
    "What happened in the news today?",
    "Write a dialogue between two people.",
    "Solve a math problem step by step.",
    "Write a poem.",
    "Give me some advice.",
    "Describe a place.",
    "Write a short essay.",
    "Write a letter to a friend.",
    "Answer a question about science.",
    "Write some code in any language.",
    "Summarize a book you like.",
    "Écris un court texte en français.",
    "Escribe un párrafo en español.",
    "Schreib einen kurzen Text auf Deutsch.",
    "用中文写一段话。",
    "Write a recipe.",
    "Explain a historical event.",
    "Write a product review.",
    "Teach me something about computers.",
    "Write an email to a colleague.",
    "Hello!",
)
# Rows generated together: batches amortize the per-step overhead of a decode step. Batch b is seeded
# by (seed, b) alone, so the first n rows are the same however many are sampled at once: a cache of
# k batches serves every request of up to k batches and is extended by the missing ones.
BATCH_ROWS = 32
# Decode steps between two returns of freed heap memory to the system (`_trim`): each step grows every
# layer's K/V tensors by one token through a new allocation, and glibc, whose mmap threshold rises once
# the first large logits are freed, places these growing tensors in its heap and fragments it. Sampling
# 32 rows of 512 tokens (a 0.88 GiB KV cache) from Qwen2.5-Coder-1.5B, the memory above the model fell
# from 7.7 to 1.35 GiB, the same ids, no slower; on a random model of its cache shape from 1.8-3.8 to
# 1.2-1.6 GiB at 5% more time (benchmarks/bench_sampling.py). Trimming at every step was no lower, and slower.
TRIM_EVERY = 8
# Decode steps between two progress lines when stderr is not a terminal (a terminal gets a bar): one
# batch of Qwen2.5-Coder-1.5B took 15 to 56 minutes on one thread of a 2-core CPU (docs/convert.md).
LOG_EVERY = 64


@dataclass(frozen=True)
class SampleSettings:
    """Everything that determines the samples besides the model and how many rows are wanted."""

    seq_len: int
    temperature: float = 1.0
    seed: int = 0
    chat: bool = True


def _model_key(folder: Path) -> str:
    """A hash of what identifies the model's weights and tokenizer without reading the weights:
    config.json, tokenizer files and every weight file's name, size and header."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" or path.name == "pytorch_model.bin":
            stat = path.stat()
            h.update(f"{path.name}:{stat.st_size}".encode())
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 16))
        elif path.name == "config.json" or path.name.startswith(("tokenizer", "chat_template")):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def sampling_dtype(folder: Path, device: str = "cpu") -> torch.dtype:
    """What samples are drawn in: the model's stored 16-bit type where `device` multiplies it at least
    as fast as float32 (GPUs; CPUs with AMX or AVX512-BF16, where Qwen2.5-Coder-1.5B sampled 2.5
    times as fast in bf16), else float32 (AVX2-only CPUs, where bf16 decode-sized matmuls are slower)."""
    return run_dtype(device, CheckpointReader(folder).dtype())


def cache_path(folder: Path, settings: SampleSettings, device: str = "cpu") -> Path:
    """Where samples of this model with these settings are kept, as many batches as were asked for
    so far: under $MLAKIT_CACHE (default ~/.cache/mlakit), in samples/. Samples drawn in a 16-bit
    type (`sampling_dtype`) are other tokens than float32's, so they are kept apart."""
    root = Path(os.environ.get("MLAKIT_CACHE", Path.home() / ".cache" / "mlakit")).expanduser()
    dtype = sampling_dtype(folder, device)
    narrow = "" if dtype == torch.float32 else str(dtype)
    key = hashlib.sha256((_model_key(folder) + json.dumps(asdict(settings), sort_keys=True)
                          + json.dumps(PROMPTS) + narrow).encode()).hexdigest()[:32]
    return root / "samples" / f"{key}.safetensors"


def prompt_ids(tokenizer, chat: bool) -> list[list[int]]:
    """Token ids that start each kind of sample: a user turn through the chat template and the
    assistant's header, or the request as plain text after the BOS token."""
    if chat and tokenizer.chat_template:
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False) for p in PROMPTS]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


@torch.no_grad()
def _generate(model, starts: list[list[int]], seq_len: int, temperature: float,
              generator: torch.Generator, on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Rows of exactly `seq_len` tokens: each start (left-padded to the longest) followed by sampled
    tokens, the end-of-turn token included (the model then writes on, as it would in a
    conversation); the padding is cut off so that each row is real tokens from position 0.
    `on_step` is called after every decode step."""
    device = next(model.parameters()).device
    width = max(map(len, starts))
    ids = torch.zeros(len(starts), width, dtype=torch.long)  # padding: masked, any id in the vocabulary
    mask = torch.zeros_like(ids)
    for i, s in enumerate(starts):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    steps = seq_len + width - min(map(len, starts))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, rows = out.cache, [ids]
    logits = out.logits[:, -1]
    for step in range(steps - width):
        if step % TRIM_EVERY == TRIM_EVERY - 1:
            _trim()
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        rows.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        if on_step:
            on_step()
    full = torch.cat(rows, dim=1).cpu()
    return torch.stack([row[width - len(s): width - len(s) + seq_len] for row, s in zip(full, starts)])


def batches(rows: int) -> int:
    return -(-rows // BATCH_ROWS)


def cached_rows(path: Path) -> int:
    """Rows a cache file holds (0 when it is missing or unreadable), from its header."""
    try:
        with safe_open(path, "pt") as fh:
            return fh.get_slice("ids").get_shape()[0]
    except Exception:  # missing or damaged: sampled again
        return 0


def sample_windows(folder: Path, tokenizer, settings: SampleSettings, rows: int, device: str = "cpu",
                   log: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """(rows, seq_len) token ids sampled from the model in `folder`, and a record of how; the batches
    an earlier run sampled with the same model and settings are read from the cache."""
    path, dtype = cache_path(folder, settings, device), sampling_dtype(folder, device)
    record = {"kind": "sampled from the source model", **asdict(settings), "prompts": list(PROMPTS),
              "chat_template": bool(settings.chat and tokenizer.chat_template), "dtype": str(dtype).removeprefix("torch."),
              "cache": path.name}
    have = cached_rows(path)
    ids = load_file(path)["ids"] if have else torch.zeros(0, settings.seq_len, dtype=torch.long)
    if have >= rows:
        return ids[:rows], {**record, "cached": True}
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    # Loaded as stored, then widened tensor by tensor where it runs in float32: loading straight into
    # float32 holds the whole stored checkpoint beside the float32 model at its peak. (`dtype` is the
    # stored one or float32: narrowing with `.to` would round the float32 rotary frequencies too.)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map=device).eval()
    if dtype == torch.float32:
        model.float()
    starts = prompt_ids(tokenizer, settings.chat)
    todo = {b: [starts[i % len(starts)] for i in range(b * BATCH_ROWS, (b + 1) * BATCH_ROWS)]
            for b in range(have // BATCH_ROWS, batches(rows))}
    steps = sum(settings.seq_len - min(map(len, batch)) for batch in todo.values())
    bar = tqdm(total=steps * BATCH_ROWS, desc="sampling calibration text", unit="token", leave=False, disable=None)
    saved, step = have, 0  # rows saved, decode steps of the batch under way

    def on_step() -> None:
        nonlocal step
        bar.update(BATCH_ROWS)
        step += 1
        if log and bar.disable and step % LOG_EVERY == 0:
            log(f"sampling calibration text from the model: rows {saved + 1}-{saved + BATCH_ROWS}, "
                f"{step} tokens each so far, {time.perf_counter() - start:.0f} s")

    for b, batch in todo.items():
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + b)
        ids = torch.cat([ids, _generate(model, batch, settings.seq_len, settings.temperature, generator, on_step)])
        _save(path, ids, record)  # after every batch: an interrupted run keeps what it sampled
        saved, step = (b + 1) * BATCH_ROWS, 0
        if log:
            log(f"sampling calibration text from the model: {(b + 1) * BATCH_ROWS}/{batches(rows) * BATCH_ROWS} "
                f"rows of {settings.seq_len} tokens, {time.perf_counter() - start:.0f} s")
    bar.close()
    del model
    release_freed_memory()
    return ids[:rows], {**record, "cached": False, "seconds": round(time.perf_counter() - start, 1)}


def release_freed_memory() -> None:
    """Hand the memory of freed objects back to the operating system. glibc keeps the heap that
    generation's many mid-sized tensors leave behind: after sampling, SmolLM2-135M's process held
    about the float32 model's size more than before it, which the conversion that follows would
    have on top of its own peak. No-op where the C library has no malloc_trim."""
    gc.collect()
    _trim()


def _trim() -> None:
    """glibc's malloc_trim: unmap the free pages of every heap. No-op where the C library has none."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _save(path: Path, ids: torch.Tensor, record: dict) -> None:
    """Write the cache file whole, then rename it into place: a reader never sees a partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"ids": ids.contiguous()}, tmp, metadata={"settings": json.dumps(record)})
        os.replace(tmp, path)
    except OSError as exc:
        raise disk_error(exc, path) from exc
