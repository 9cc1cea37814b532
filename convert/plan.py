"""Plan a conversion before any weight is read: options, shapes, ranks, cache sizes, refusals, costs.

Everything here comes from config.json and the safetensors headers, so that a mistake (a bad
option, a weight of the wrong shape) is one error line before the first layer, and the user sees
the cache the output will have and what the run will cost (`cost.py`) before it starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mlakit.convert import rope
from mlakit.convert.calibration import token_shares
from mlakit.convert.cost import Cost, Work, available_ram, estimate, sample_bytes, sample_seconds
from mlakit.core import deepseek, engines
from mlakit.core.checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, resolve_model
from mlakit.core.errors import MlakitError
from mlakit.core.families import SourceSpec, check_weights, load_spec
from mlakit.core.guard import positive
from mlakit.core.latent import NATIVE_METRIC_STEPS
from mlakit.core.sampling import BATCH_ROWS, SampleSettings, batches, cache_path, cached_rows
from mlakit.core.text import MIX_TEXT, tokenized_bytes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LATENT_FORMATS = ("exact", "native")
# o_proj refits a conversion solves per layer, for the estimate: the walk from the middle of the
# ladder takes three where the best ridge is inside it (pipeline._choose_output).
RIDGES_WALKED = 3
GiB = 2**30


@dataclass
class ConvertOptions:
    """Every knob of a conversion; the CLI fills it from flags."""

    kv_lora_rank: int | str | None = None  # a number, or an engine whose latent width to take (engines.TARGETS)
    rope_dim: int | None = None  # None: DEFAULT_ROPE_DIM, or what `cache_split` gives for `cache`
    # Share of the source's KV cache per token to keep (0 < cache < 1): kv_lora_rank and rope dim from it.
    cache: float | None = None
    calib_text: list[Path] | None = None
    calib_tokens: int = 32768
    calib_seq_len: int = 512
    calib_bos: bool = False
    # Also calibrate on the model's own samples when calib_text is given (half the tokens each).
    calib_mix: bool = False
    calib_temperature: float = 1.0
    calib_seed: int = 0
    # Share of the calibration windows held out to choose the o_proj refit and the rope strategy.
    held_out: float = 0.125
    # Shrinkage of each layer's input second moment towards its diagonal (0: none). None: `moment_shrink`.
    shrink: float | None = None
    # Weight of the keys' error against the values' in the joint latent, after `balance` equalizes
    # their output energies: 0.25, 0.35 and 0.5 all beat 1 on unseen text (docs/real-models.md).
    key_weight: float = 0.5
    # Fill the format's padded value dims (v_head > the source's head dim) with latent directions the
    # value rows leave out, for the o_proj refit to use: SmolLM2-135M at half the cache, worst unseen
    # kind +31.8% -> +30.0%, mean +22.5% -> +21.9% (docs/real-models.md). No-op at head dim 128.
    extra_values: bool = True
    dtype: str = "bf16"
    device: str = "cpu"
    rope_strategy: str = "auto"
    complex_pca: bool = True
    expected_rotation: bool = True
    activation_aware: bool = True
    output_aware: bool = True
    balance: bool = True
    llama3_rope: str = "yarn"
    latent: str = "exact"
    # L-BFGS iterations of the native format's latent metric (0: the plain latent directions).
    native_metric_steps: int = NATIVE_METRIC_STEPS
    strategy_tokens: int = 16384
    # The attention-distance histogram is a per-head distribution over distances: the first windows
    # estimate it as well as all of them, and it costs half of the statistics pass.
    histogram_tokens: int = 16384
    refit_output: bool = True
    # Ridges of the o_proj refit (relative to the mean input energy): the ladder walked on the
    # held-out windows, from `refit_ridge`, the one used when nothing is held out.
    refit_ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    refit_ridge: float = 1e-2
    shard_bytes: int = DEFAULT_SHARD_BYTES
    revision: str | None = None

    @property
    def moment_shrink(self) -> float:
        """`shrink`, or by default 0.5 on the default set and with calib_mix (best of 0, 0.2 and 0.5 on
        text unlike the calibration text) and 0 on calib_text alone, which names the text to serve:
        SmolLM2-135M at half the cache in its calibration domain +4.8% -> +3.5% (docs/real-models.md)."""
        if self.shrink is not None:
            return self.shrink
        return 0.0 if self.calib_text and not self.calib_mix else 0.5

    @property
    def ridge_ladder(self) -> list[float]:
        """The refit's ridges in ascending order, the start among them."""
        return sorted({*self.refit_ridges, self.refit_ridge})


@dataclass
class Plan:
    """What a conversion will do and cost, known from config.json and the shard headers."""

    source: str
    folder: Path
    spec: SourceSpec
    shape: deepseek.MLAShape
    strategies: list[str]
    dtype: torch.dtype
    reader: CheckpointReader
    cost: Cost
    latent: str = "exact"
    notes: list[str] = field(default_factory=list)
    padded_rank: int | None = None  # the written kv_lora_rank when the latent is zero-padded past `shape`'s

    @property
    def served_shape(self) -> deepseek.MLAShape:
        """The shape written and served: `shape`, whose rank the conversion fills, widened by any padding."""
        return replace(self.shape, kv_lora_rank=self.padded_rank or self.shape.kv_lora_rank)

    def cache_summary(self) -> dict:
        nbytes = torch.finfo(self.dtype).bits // 8
        src = self.spec.kv_elements_per_token_layer()
        new = self.served_shape.kv_elements_per_token_layer()
        return {
            "source_elements_per_token_layer": src,
            "converted_elements_per_token_layer": new,
            "source_bytes_per_token": src * nbytes * self.spec.layers,
            "converted_bytes_per_token": new * nbytes * self.spec.layers,
            "reduction_percent": round(100 * (1 - new / src), 2),
        }

    def describe(self) -> str:
        """The plan a user reads before the first layer (and all that --dry-run prints)."""
        spec, shape, cost, kv = self.spec, self.served_shape, self.cost, self.cache_summary()
        out = str(self.dtype).removeprefix("torch.")
        lines = [
            f"plan: {self.source} ({spec.model_type}, {spec.layers} layers, hidden {spec.hidden}, {spec.heads} q / "
            f"{spec.kv_heads} kv heads of {spec.head_dim}, vocab {spec.vocab}, stored as "
            f"{str(self.reader.dtype()).removeprefix('torch.')}); every weight's shape matches config.json",
            f"  output: kv_lora_rank {shape.kv_lora_rank}, rope dim {shape.qk_rope}, (qk_nope, qk_rope, v) = "
            f"({shape.qk_nope}, {shape.qk_rope}, {shape.v_head}), {out}, rope strategy "
            f"{self.strategies[0] if len(self.strategies) == 1 else 'chosen among ' + ', '.join(self.strategies)}, "
            f"{self.latent} latent"
            + (" (fitted per layer in the same pass, counted below)" if self.latent == "native" else ""),
            f"  KV cache per token: {kv['source_elements_per_token_layer']} -> "
            f"{kv['converted_elements_per_token_layer']} elements per layer, {kv['source_bytes_per_token']} -> "
            f"{kv['converted_bytes_per_token']} bytes over all layers in {out} ({-kv['reduction_percent']:+}%)",
            f"  estimated: peak RAM {cost.ram_bytes / GiB:.1f} GiB"
            + (f", peak GPU memory {cost.gpu_bytes / GiB:.1f} GiB" if cost.gpu_bytes is not None else "")
            + f", output {cost.disk_bytes / 1e9:.2f} GB on disk, time {_duration(cost.seconds)} "
            f"(compute at {cost.gflops:.0f} GFLOP/s measured now; reading excluded)",
        ]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


DEFAULT_ROPE_DIM = 64  # what the fast MLA kernels (vLLM, FlashMLA) take
# Below this many cache elements per token per layer, 32 rotary dims and a wider latent lose less than
# 64 rotary dims (measured on SmolLM2-135M and Qwen2.5-Coder-1.5B, docs/real-models.md: at 96 and 128
# elements 64 + 32 and 96 + 32 beat 32 + 64 and 64 + 64; at 192 and 256, 128 + 64 and 192 + 64 beat
# 160 + 32 and 128 + 128).
WIDE_ROPE_BUDGET = 192


def cache_split(spec: SourceSpec, share: float, rope_dim: int | None) -> tuple[int, int]:
    """(kv_lora_rank, rope dim) whose cache is `share` of the source's per token: the rope dim given,
    or 64 from WIDE_ROPE_BUDGET elements on and 32 below (each the largest valid one not above it),
    and the latent takes the rest."""
    if not 0 < share < 1:
        raise MlakitError(f"--cache {share:g}: give a share of the source's KV cache between 0 and 1 (e.g. 0.5 or 25%)")
    budget = math.floor(share * spec.kv_elements_per_token_layer())
    if rope_dim is None:
        half = spec.head_dim // 2
        most = (DEFAULT_ROPE_DIM if budget >= WIDE_ROPE_BUDGET else DEFAULT_ROPE_DIM // 2) // 2
        rope_dim = 2 * max((s for s in range(1, min(most, half) + 1) if half % s == 0), default=1)
    if budget - rope_dim < 1:
        raise MlakitError(f"--cache {share:g} is {budget} elements per token per layer, no more than the rope dim "
                          f"{rope_dim}: give a larger share")
    return budget - rope_dim, rope_dim


def default_rank(spec: SourceSpec, rope_dim: int) -> int:
    """512 (the fast kernels' size) when the source can fill it, else the largest power of two
    that halves the source's cache."""
    most = 2 * spec.kv_heads * spec.head_dim - rope_dim
    if most >= 512:
        return 512
    half = spec.kv_elements_per_token_layer() // 2 - rope_dim
    return 2 ** int(math.log2(max(half, 1)))


def _shape_at(spec: SourceSpec, rope_dim: int) -> Callable[[int], deepseek.MLAShape]:
    """The output shape for each kv_lora_rank."""
    qk_nope, v_head = deepseek.head_dims(spec.head_dim)
    return lambda rank: deepseek.MLAShape(spec.hidden, spec.heads, qk_nope, rope_dim, v_head, rank)


def _rank(spec: SourceSpec, rope_dim: int, request: int | str | None) -> tuple[int, int | None, str]:
    """(rank the conversion fills, rank it is zero-padded to or None, the plan's note) for `--kv-lora-rank`:
    a number, the default, or an engine's width (`engines.engine_rank`)."""
    most = spec.kv_elements_per_token_layer() - rope_dim
    if isinstance(request, str):
        try:
            choice = engines.engine_rank(request, spec.kv_elements_per_token_layer(), rope_dim,
                                         _shape_at(spec, rope_dim))
        except ValueError as exc:
            raise MlakitError(str(exc)) from exc
        return choice.filled, choice.padded, choice.note
    positive("--kv-lora-rank", request, "the rank")
    rank = request or default_rank(spec, rope_dim)
    if rank > most:
        raise MlakitError(
            f"--kv-lora-rank {rank}: this source can fill at most {most} (2 * {spec.kv_heads} kv heads * "
            f"{spec.head_dim} - rope dim {rope_dim}); choose a smaller rank, or name an engine "
            f"({', '.join(engines.TARGETS)}) to get its latent width, zero-padded where the source fills less"
        )
    return rank, None, "" if request else f"kv_lora_rank defaults to {rank} for this source"


def _engine_notes(shape: deepseek.MLAShape) -> list[str]:
    """Which engines serve the shape, and for each rule it misses, why (with the engine source line)."""
    served, refused = engines.served_by(shape)
    lines = [f"engines: served by {', '.join(served)}" + (f"; refused by {', '.join(refused)}" if refused else "")]
    for rule, ok in engines.shape_rows(shape):
        if ok or not rule.fatal and not {engines.ENGINE_NAMES[e] for e in rule.engines} & set(served):
            continue  # a kernel of an engine that refuses the shape anyway is not worth a line
        lines.append(f"{'refused' if rule.fatal else 'warning'}: {rule.name}: {rule.detail(shape)}")
    return lines


def make_plan(source: str, opts: ConvertOptions) -> Plan:
    """Check everything that can be checked without reading weights, every weight's shape included;
    raise MlakitError if not."""
    if opts.dtype not in DTYPES:
        raise MlakitError(
            f"--dtype {opts.dtype} refused: the exact latent-norm trick puts latent values into fp16 subnormals; "
            "use bf16 or fp32"
        )
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise MlakitError("--device cuda: no CUDA device is available; use --device cpu")
    if opts.calib_seq_len < 16 or opts.calib_tokens < opts.calib_seq_len:
        raise MlakitError("--calib-tokens must be at least --calib-seq-len, which must be at least 16")
    if opts.calib_mix and not opts.calib_text:
        raise MlakitError("--calib-mix mixes --calib-text with text sampled from the model: give --calib-text too")
    if opts.calib_bos and not opts.calib_text:
        raise MlakitError("--calib-bos leads --calib-text windows with the BOS token (text sampled from the model "
                          "starts with its own prompt): give --calib-text too")
    if opts.calib_temperature <= 0:
        raise MlakitError(f"--calib-temperature {opts.calib_temperature}: must be positive")
    if not 0 <= opts.held_out <= 0.5:
        raise MlakitError(f"held-out share {opts.held_out}: must be between 0 and 0.5")
    if not opts.key_weight > 0:
        raise MlakitError(f"key weight {opts.key_weight}: must be positive")
    if opts.cache is not None and opts.kv_lora_rank is not None:
        raise MlakitError("--cache chooses the kv_lora_rank: give --cache or --kv-lora-rank, not both")
    folder = resolve_model(source, opts.revision)
    spec = load_spec(folder)
    request, r = opts.kv_lora_rank, opts.rope_dim or DEFAULT_ROPE_DIM
    if opts.cache is not None:
        request, r = cache_split(spec, opts.cache, opts.rope_dim)
    d = spec.head_dim
    if r > d:
        raise MlakitError(f"--rope-dim {r} is larger than the source's head_dim {d}; use at most {d}")
    if r < 2 or r % 2 or (d // 2) % (r // 2):
        raise MlakitError(
            f"--rope-dim {r}: must be even and its half must divide the {d // 2} source frequencies (e.g. {d // 2})"
        )
    rank, padded, rank_note = _rank(spec, r, request)
    if opts.cache is not None:
        rank_note = f"--cache {opts.cache:g}: kv_lora_rank {rank} + rope dim {r}"
    shape = _shape_at(spec, r)(rank)
    if opts.rope_strategy == "auto":
        strategies = list(rope.STRATEGIES) if r < d else ["fold"]
    elif rope.valid_strategy(opts.rope_strategy, r // 2):
        strategies = [opts.rope_strategy]
    else:
        raise MlakitError(f"--rope-strategy {opts.rope_strategy}: choose auto, {', '.join(rope.STRATEGIES)} or foldN "
                          f"with N dividing the {r // 2} rotary slots")
    if opts.llama3_rope not in ("yarn", "keep"):
        raise MlakitError(f"--llama3-rope {opts.llama3_rope}: choose yarn or keep")
    if opts.latent not in LATENT_FORMATS:
        raise MlakitError(f"--latent {opts.latent}: choose {' or '.join(LATENT_FORMATS)}")
    reader = CheckpointReader(folder)
    check_weights(spec, reader)
    _, n_bundled, n_sampled = token_shares(opts.calib_tokens, opts.calib_text, opts.calib_mix)
    wanted = max(1, n_sampled // opts.calib_seq_len) if n_sampled else 0
    settings = SampleSettings(opts.calib_seq_len, opts.calib_temperature, opts.calib_seed)
    have = cached_rows(cache_path(folder, settings, opts.device))
    cached = have >= wanted
    sample_rows = 0 if cached else (batches(wanted) - have // BATCH_ROWS) * BATCH_ROWS
    work = _work(spec, shape, strategies, DTYPES[opts.dtype], reader, opts, sample_rows)
    _check_sampling_fits(work)
    plan = Plan(source, folder, spec, shape, strategies, DTYPES[opts.dtype], reader, estimate(work),
                opts.latent, padded_rank=padded)
    if n_sampled:
        when = "cached by an earlier run" if cached else \
            f"about {_duration(sample_seconds(work))} of the estimated time"
        plan.notes.append(f"calibration: {n_bundled} tokens of the bundled mix and {n_sampled} sampled from the "
                          f"model ({when}); --calib-text calibrates on your own text instead")
    plan.notes += [rank_note] if rank_note else []
    if padded is None and shape.kv_elements_per_token_layer() >= spec.kv_elements_per_token_layer():
        plan.notes.append("warning: the MLA cache is not smaller than the source's; lower --kv-lora-rank")
    plan.notes += _engine_notes(plan.served_shape)
    rope_type = spec.rope.get("rope_type", "default")
    if rope_type == "linear" or (rope_type == "llama3" and opts.llama3_rope == "keep"):
        plan.notes.append(f"warning: {rope_type} rope scaling is exact in transformers; vLLM and SGLang apply YaRN")
    return plan


def _check_sampling_fits(work: Work) -> None:
    """Sampling runs the whole model, unlike the layer stream: refuse before the first layer where it
    cannot fit in host memory, rather than be killed for memory mid-run."""
    need, have = sample_bytes(work), available_ram()
    if work.device.startswith("cuda") or not need or have is None or need <= have:
        return
    raise MlakitError(
        f"sampling calibration text from the model holds it whole in float32: about {need / GiB:.1f} GiB, and "
        f"{have / GiB:.1f} GiB is available; give --calib-text FILE (text like what the model will serve), or "
        "convert on a GPU that holds the model (--device cuda)"
    )


def value_dim(spec: SourceSpec, shape: deepseek.MLAShape, opts: ConvertOptions) -> int:
    """Value dims per head that carry something: the source's head dim, or with `opts.extra_values`
    as many more of the format's padded ones (v_head > head_dim) as the latent has directions for."""
    if not opts.extra_values:
        return spec.head_dim
    return max(spec.head_dim, min(shape.v_head, shape.kv_lora_rank))


def _work(spec: SourceSpec, shape: deepseek.MLAShape, strategies: list[str], dtype: torch.dtype,
          reader: CheckpointReader, opts: ConvertOptions, sample_rows: int) -> Work:
    """What `pipeline.convert` will do with these options, in the terms of the cost model."""
    rows = opts.calib_tokens // opts.calib_seq_len
    probe = max(1, min(rows, opts.strategy_tokens // opts.calib_seq_len)) if len(strategies) > 1 else 0
    head = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
    text = tokenized_bytes([p for p in opts.calib_text or [] if Path(p).is_file()])
    text += MIX_TEXT.stat().st_size if token_shares(opts.calib_tokens, opts.calib_text, opts.calib_mix)[1] else 0
    return Work(spec, shape, out_dtype=dtype, embed=reader.info("model.embed_tokens.weight"),
                head=reader.info(head), layer_dtype=reader.dtype(), rows=rows, seq_len=opts.calib_seq_len,
                value_dims=value_dim(spec, shape, opts),
                histogram_tokens=opts.histogram_tokens, candidates=len(strategies), probe_rows=probe,
                device=opts.device, text_bytes=text, sample_rows=sample_rows, native=opts.latent == "native",
                held_out=opts.held_out,
                ridges=(RIDGES_WALKED if opts.held_out else 1) if opts.refit_output else 0)
