"""What a conversion will cost, from shapes alone: bytes on disk, peak memory and time.

The memory model names what `pipeline._convert_layer` holds at each of its steps (the carried
calibration activations, one source layer in float32, the layer's statistics, each candidate's
converted attention and normal equations, and the largest temporary of the step) and what the
stream holds between layers (one whole embedding matrix as read); the peak is the largest step.
Its few constants are fitted to measured peaks, and benchmarks/bench_memory.py prints estimate
and measurement side by side. The time is a FLOP count of the layer work over the matmul
throughput measured on this machine at planning time, with three constants fitted to measured
conversions of a 135M model, the bundled demo and Llama-3.1-8B-shaped layers; the same benchmark
prints estimated against measured time.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from mlakit.core import deepseek
from mlakit.core.latent import NATIVE_METRIC_STEPS, NATIVE_METRIC_TOKENS
from mlakit.core.checkpoint import TensorInfo
from mlakit.core.families import SourceSpec
from mlakit.core.forward import ACTIVATION_BYTES, row_chunks
from mlakit.core.precision import run_dtype
from mlakit.core.sampling import BATCH_ROWS

F32, F64 = 4, 8
# Resident before the text is tokenized (interpreter, torch, transformers), and from then on besides
# the model's tensors (the tokenizer, allocator pools).
IMPORT_BYTES = int(0.4 * 2**30)
RUNTIME_BYTES = int(0.6 * 2**30)
# Peak resident bytes per byte of calibration text while it is tokenized whole (a byte-level tokenizer).
TOKENIZE_BYTES_PER_TEXT_BYTE = 300
# Float64 temporaries alive at once: of the rope step and latent, in (heads * head_dim, hidden)
# matrices (the query weights and their complex and padded copies), and of the o_proj refit, in
# (heads * head_dim)^2 matrices (the regularized system, its factorization, the solution).
ATTENTION_TEMPORARIES = 14
REFIT_TEMPORARIES = 7
# Shares of the measured matmul throughput that the passes over calibration tokens (attention,
# norms) and the per-layer float64 linear algebra (eigh, solves) reach; with ELEMENTWISE_FLOPS
# fitted to bench_memory.py's measured times on SmolLM2-135M, the demo and 8B-shaped layers.
PASS_EFFICIENCY = 0.7
ALGEBRA_EFFICIENCY = 0.5
# The o_proj refit's LU solves and products, (heads * head_dim)-square: BLAS-3 at near the float64
# matmul rate (measured at Llama-3.1-70B and 8B shapes, where they are most of the error pass).
SOLVE_EFFICIENCY = 0.9
# The elementwise work of a pass (norms, rope, padding, copies) per activation value of a token, in
# matmul FLOPs: memory-bound, it is most of the time of small models (hidden 256 to 576).
ELEMENTWISE_FLOPS = 2600
# Sampling calibration text: the seconds of framework overhead per decoder layer of each decode step,
# besides its matmuls.
DECODE_SECONDS_PER_LAYER_STEP = 1e-3
# Share of one thread's matmul rate that a CPU decode step (32 rows through every weight) reaches,
# whatever the thread count: 32 rows of 512 tokens took 361 s from SmolLM2-135M with both cores of an
# idle 2-core machine (12 GFLOP/s, 0.35 of one thread's 34) and 3347 s from Qwen2.5-Coder-1.5B on one
# thread beside another job (15 GFLOP/s, 0.44); one thread's rate times the thread count, the unit of
# the passes, put the first at 2 minutes. In bf16 on an AMX Xeon, whose 2048 x 2048 products reach
# 1131 GFLOP/s on one thread (159 in float32), decode-sized ones fill its tiles poorly: 32 rows of 512
# tokens from Qwen2.5-Coder-1.5B took 350 s on one thread beside another job (143 GFLOP/s, 0.13;
# float32 there: 864 s, 0.36).
DECODE_EFFICIENCY = {torch.float32: 0.4, torch.bfloat16: 0.13, torch.float16: 0.13}  # float16: assumed as bf16, not measured
# Decoding grows every layer's K/V tensors by a new allocation each step; with freed heap pages handed
# back every few steps (core/sampling.TRIM_EVERY) the anonymous memory of generation peaked at 1.54x
# the final KV cache on Qwen2.5-Coder-1.5B (32 rows of 512), a SmolLM2-135M conversion peaked where
# 1.0x puts it, and 1.4-1.9x on a random model of Qwen's cache shape (benchmarks/bench_sampling.py).
SAMPLE_CACHE_COPIES = 1.5
# Loading the tokenizer and tokenizing the calibration text whole, per byte of text (2-3 s for the
# bundled 1.3 MB of docstrings): most of a small model's conversion time besides its layers.
TOKENIZE_SECONDS_PER_BYTE = 2.5e-6


@dataclass(frozen=True)
class Work:
    """What a conversion will do, in the terms the cost model needs."""

    spec: SourceSpec
    shape: deepseek.MLAShape
    out_dtype: torch.dtype
    embed: TensorInfo
    head: TensorInfo
    layer_dtype: torch.dtype
    rows: int
    seq_len: int
    histogram_tokens: int
    candidates: int
    probe_rows: int
    device: str
    text_bytes: int
    sample_rows: int = 0  # rows of calibration text to sample from the source (0: given, or cached)
    native: bool = False
    held_out: float = 0.0  # share of the rows held out
    ridges: int = 1  # o_proj refits solved per candidate (0: no refit)
    value_dims: int = 0  # value dims per head the o_proj refit reads (0: the source's head dim)


@dataclass(frozen=True)
class Cost:
    """Estimated peak resident memory, peak GPU memory (torch's allocations; None on the CPU),
    output bytes on disk (the tensors' bytes, exact) and seconds of compute."""

    ram_bytes: int
    gpu_bytes: int | None
    disk_bytes: int
    seconds: float
    gflops: float


def disk_bytes(spec: SourceSpec, shape: deepseek.MLAShape, dtype: torch.dtype) -> int:
    """Bytes of the output's tensors: every weight `mlakit check` expects of it, in the output dtype."""
    config = deepseek.build_config(spec, shape, spec.rope, dtype)
    return sum(math.prod(s) for s in deepseek.expected_shapes(config).values()) * dtype.itemsize


@dataclass(frozen=True)
class _Step:
    """Bytes at the peak of one step: on the conversion device, and in host memory besides."""

    device: int
    host: int = 0


def _layer_steps(w: Work, rows: int, k: int) -> list[_Step]:
    """The steps of `_convert_layer` on `rows` calibration windows with k rope candidates: reading the
    layer, the statistics pass, the rope step and latent, the o_proj fit and refit, the MLP pass."""
    s, m = w.spec, w.shape
    D, I, L, d, hd, kv = s.hidden, s.intermediate, w.seq_len, s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim
    n, it = rows * L, w.layer_dtype.itemsize
    chunk = min(rows, row_chunks(rows, L, max(I, D))[0].stop) * L
    carried = 2 * F32 * n * D  # hidden states and the source attention's output
    source = F32 * (2 * D * hd + 2 * D * kv + 3 * D * I + 2 * D + (hd + 2 * kv if s.qkv_bias else 0))
    stats = F64 * D * D
    converted = F32 * (m.heads * m.qk_head * D + (m.kv_lora_rank + m.qk_rope) * D
                       + m.heads * (m.qk_nope + m.v_head) * m.kv_lora_rank + D * m.heads * m.v_head)
    hv = s.heads * (w.value_dims or d)  # the o_proj refit's inputs
    unpadded = F32 * (s.heads * (d + m.qk_rope) * D + (hd + hv) * m.kv_lora_rank + D * hv)  # what the fit runs
    normal = F64 * (hv * hv + hv * D)
    refitted = F64 * D * (hv + m.heads * m.v_head)  # the refitted o_proj, plain and padded, until the layer ends
    mlp_copy = 3 * D * I * it if w.layer_dtype != torch.float32 else 0  # the MLP runs in the stored dtype
    held = carried + source + stats
    tile = min(ACTIVATION_BYTES, F32 * min(chunk, w.histogram_tokens) * s.heads * L)  # distance scores, softmax
    statistics = F32 * chunk * (D + 4 * hd + 4 * kv) + 2 * tile
    fit = F32 * chunk * (D + 9 * s.heads * (d + m.qk_rope))
    refit = REFIT_TEMPORARIES * F64 * hv * hv
    mlp = F32 * chunk * 4 * D + it * chunk * (3 * I + 2 * D)
    attention = ATTENTION_TEMPORARIES * F64 * hd * D
    cuda = w.device.startswith("cuda")  # then the layer is read on the host, and runs on the device
    built = k * converted  # kept on the host; the fit runs an unpadded copy on the device
    fitting = held + k * (unpadded + normal) + mlp_copy + (0 if cuda else built)
    on_host = built if cuda else 0
    return [_Step(carried // 2 + source, source if cuda else 0), _Step(held + statistics),
            _Step(held + attention, (k - 1) * converted),
            _Step(fitting + max(fit, refit), on_host), _Step(fitting + k * refitted + mlp, on_host)]


def source_parameters(spec: SourceSpec) -> int:
    """Weights of the source model (an untied lm_head counted once more)."""
    D, I, hd, kv = spec.hidden, spec.intermediate, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    layer = 2 * D * hd + 2 * D * kv + 3 * D * I
    return spec.layers * layer + (1 if spec.tied else 2) * spec.vocab * D


def sample_bytes(w: Work) -> int:
    """Sampling calibration text: the whole model in the dtype it samples in (`run_dtype`; where that
    is float32 on the CPU, a stored tensor being widened is mapped beside it), the KV cache of a batch
    of rows at full length as decoding leaves it in the heap (SAMPLE_CACHE_COPIES), and one step's
    logits."""
    if not w.sample_rows:
        return 0
    s = w.spec
    size = run_dtype(w.device, w.layer_dtype).itemsize
    rows = min(w.sample_rows, BATCH_ROWS)
    cache = size * rows * w.seq_len * s.layers * 2 * s.kv_heads * s.head_dim
    model = size * source_parameters(s)
    narrow = [t.nbytes for t in (w.embed, w.head) if t.dtype.itemsize < size]
    widened = 0 if w.device.startswith("cuda") else max(narrow, default=0)
    return model + widened + int(SAMPLE_CACHE_COPIES * cache) + 2 * F32 * rows * s.vocab


def _sample_step(w: Work) -> _Step:
    return _Step(sample_bytes(w)) if w.device.startswith("cuda") else _Step(0, sample_bytes(w))


def available_ram() -> int | None:
    """Bytes the kernel can hand out now without swapping (MemAvailable), None where it is not told."""
    try:
        with open("/proc/meminfo") as fh:
            line = next(line for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def sample_seconds(w: Work) -> float:
    """Sampling `sample_rows` rows: every token through every weight, attention over the rows'
    average context, and the per-step overhead of a decode step, at the device's matmul GFLOP/s in
    the dtype it samples in (`matmul_gflops`, `run_dtype`), of which a CPU decode step gets
    DECODE_EFFICIENCY (for that dtype) of one thread's share."""
    if not w.sample_rows:
        return 0.0
    run_as = run_dtype(w.device, w.layer_dtype)
    rate = matmul_gflops(w.device, run_as)
    s = w.spec
    tokens = w.sample_rows * w.seq_len
    attention = 2 * s.layers * 2 * s.heads * s.head_dim * w.seq_len / 2
    flops = tokens * (2 * source_parameters(s) + attention)
    steps = -(-w.sample_rows // BATCH_ROWS) * w.seq_len
    if w.device.startswith("cuda"):
        compute = flops / (rate * 1e9) / PASS_EFFICIENCY
    else:
        compute = flops / (rate / torch.get_num_threads() * 1e9) / DECODE_EFFICIENCY[run_as]
    return compute + steps * s.layers * DECODE_SECONDS_PER_LAYER_STEP


def _model_steps(w: Work) -> list[_Step]:
    """Sampling and tokenizing the calibration text, and the embeddings and lm_head, each read whole to
    be written."""
    D, n = w.spec.hidden, w.rows * w.seq_len

    def written(info: TensorInfo) -> int:
        return info.nbytes + (math.prod(info.shape) * w.out_dtype.itemsize if info.dtype != w.out_dtype else 0)

    embed = _Step(F32 * n * D, written(w.embed) + n * D * w.embed.dtype.itemsize)
    tokenize = _Step(0, IMPORT_BYTES - RUNTIME_BYTES + TOKENIZE_BYTES_PER_TEXT_BYTE * w.text_bytes)
    return [_sample_step(w), tokenize, embed, _Step(0, written(w.head))]


def peak_memory(w: Work) -> tuple[int, int | None]:
    """(peak resident bytes, peak GPU bytes or None on the CPU)."""
    steps = _model_steps(w) + _layer_steps(w, w.rows, 1)
    if w.probe_rows:
        steps += _layer_steps(w, w.probe_rows, w.candidates)
    if w.device.startswith("cuda"):
        return RUNTIME_BYTES + max(s.host for s in steps), max(s.device for s in steps)
    return RUNTIME_BYTES + max(s.device + s.host for s in steps), None


def layer_flops(w: Work, tokens: int, k: int) -> tuple[float, float, float, float]:
    """FLOPs of one layer with k rope candidates: the passes over calibration tokens in float32 (their
    elementwise work in FLOP equivalents), the MLP (in the stored dtype), and the per-layer float64
    linear algebra: the rope step and latent, and the o_proj refit's solves; only the terms that grow
    with the model's dimensions."""
    s, m = w.spec, w.shape
    D, I, L, d, hd, kv = s.hidden, s.intermediate, w.seq_len, s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim
    statistics = 2 * D * (hd + 2 * kv) + 2 * L * hd + 2 * hd * D + 2 * D * D
    hv = s.heads * (w.value_dims or d)  # the o_proj refit's inputs
    fit = (2 * D * s.heads * (d + m.qk_rope) + 2 * D * (m.kv_lora_rank + m.qk_rope)
           + 2 * m.kv_lora_rank * (hd + hv) + 2 * L * s.heads * (d + m.qk_rope) + 2 * hv * hv + 2 * hv * D)
    elementwise = ELEMENTWISE_FLOPS * (D + (1 + k) * hd + I)
    passes = tokens * (statistics + k * fit + elementwise) + min(tokens, w.histogram_tokens) * L * hd
    # rope step (query energies, key covariance), query metric, latent (products and eigh), o_proj refit
    latent = 4 * hd * D * D + 2 * kv * D * D + 12 * (2 * kv) * D * D + 10 * (2 * kv) ** 3
    # each ridge's solve (LU and D right-hand sides), and the error of each refit, the prior and the
    # chosen o_proj on both parts: (heads * head_dim)^2 products with D rows
    refit = w.ridges * (2 / 3 * hv**3 + 2 * D * hv * hv) + (w.ridges + 3) * 2 * D * hv * hv
    return passes, tokens * 6 * D * I, k * latent, k * refit


@functools.cache
def matmul_gflops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Matmul GFLOP/s on `device` when it has the machine to itself, the best of three: the unit of the
    time estimate. On the CPU one thread's rate times the thread count (matmuls scale linearly over
    a few cores), timed by the process's own CPU time: with several threads, a thread that waits on
    a sibling another job has descheduled still burns CPU time, which read the rate up to 40% low
    on a busy machine."""
    cuda = device.startswith("cuda")
    n = 4096 if cuda else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    clock = time.perf_counter if cuda else time.process_time
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(3):
            start = clock()
            (a @ a).sum().item()
            best = min(best, clock() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / best / 1e9 * (1 if cuda else threads)


def native_flops(w: Work, tokens: int, held_out: int) -> tuple[float, float, float, float]:
    """FLOPs of one layer's native latent fit (pipeline._native_layer), as `layer_flops` counts them:
    the latents of the `tokens` fitting tokens, two MLA attention passes (exact and native output) on
    the `held_out` tokens, the latent metric's L-BFGS on NATIVE_METRIC_TOKENS latents and the moments
    of every latent (all float32; the moments' sums in float64 are negligible)."""
    s, m = w.spec, w.shape
    D, L, r = s.hidden, w.seq_len, m.kv_lora_rank
    attention = (2 * D * m.heads * m.qk_head + 2 * D * (r + m.qk_rope) + 2 * r * m.heads * (m.qk_nope + m.v_head)
                 + 2 * L * m.heads * (m.qk_head + m.v_head) + 2 * m.heads * m.v_head * D)
    metric = NATIVE_METRIC_STEPS * 6 * min(tokens, NATIVE_METRIC_TOKENS) * r * r
    moments = tokens * 6 * r * r
    passes = (tokens * 2 * D * r + held_out * (2 * attention + ELEMENTWISE_FLOPS * (D + 2 * m.heads * m.qk_head))
              + metric + moments)
    return passes, 0.0, 0.0, 0.0


def seconds(w: Work) -> tuple[float, float]:
    """(estimated seconds, the float32 GFLOP/s it assumes): the passes on the conversion device, the
    MLP at the rate of the dtype it runs in (`run_dtype`), the per-layer linear algebra in float64 on
    the conversion device too (a CPU's float64 at half its float32 rate; a GPU's, from 1/64 of it to
    all of it, measured), sampling and tokenizing the calibration text, and the native latent fit
    when asked for."""
    device = matmul_gflops(w.device)
    f64 = matmul_gflops(w.device, torch.float64) if w.device.startswith("cuda") else device / 2
    run_as = run_dtype(w.device, w.layer_dtype)
    mlp_rate = matmul_gflops(w.device, run_as) if run_as != torch.float32 else device
    work = [(*layer_flops(w, rows * w.seq_len, k), mlp_rate)
            for rows, k in [(w.rows, 1)] + ([(w.probe_rows, w.candidates)] if w.probe_rows else [])]
    if w.native:
        held = int(w.rows * w.held_out) * w.seq_len
        work.append((*native_flops(w, w.rows * w.seq_len - held, held or w.rows * w.seq_len), device))
    total = sum((passes / device + mlp / rate) / PASS_EFFICIENCY / 1e9
                + (algebra / ALGEBRA_EFFICIENCY + solves / SOLVE_EFFICIENCY) / f64 / 1e9
                for passes, mlp, algebra, solves, rate in work)
    tokenize = TOKENIZE_SECONDS_PER_BYTE * w.text_bytes
    return w.spec.layers * total + tokenize + sample_seconds(w), device


def estimate(w: Work) -> Cost:
    ram, gpu = peak_memory(w)
    secs, rate = seconds(w)
    return Cost(ram, gpu, disk_bytes(w.spec, w.shape, w.out_dtype), secs, rate)
