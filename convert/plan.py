"""Plan a conversion before any weight is read: options, shapes, ranks, cache sizes, refusals, costs.

Everything here comes from config.json and the safetensors headers, so that a mistake (a bad
option, a weight of the wrong shape) is one error line before the first layer, and the user sees
the cache the output will have and what the run will cost (`cost.py`) before it starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlakit.convert import rope
from mlakit.convert.cost import Cost, Work, estimate
from mlakit.core import deepseek
from mlakit.core.checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, resolve_model
from mlakit.core.errors import MlakitError
from mlakit.core.families import SourceSpec, check_weights, load_spec
from mlakit.core.guard import positive
from mlakit.core.text import DEFAULT_TEXT

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LATENT_FORMATS = ("exact", "native")
GiB = 2**30


@dataclass
class ConvertOptions:
    """Every knob of a conversion; the CLI fills it from flags."""

    kv_lora_rank: int | None = None
    rope_dim: int = 64
    calib_text: list[Path] | None = None
    calib_tokens: int = 32768
    calib_seq_len: int = 512
    calib_bos: bool = False
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
    strategy_tokens: int = 16384
    # The attention-distance histogram is a per-head distribution over distances: the first windows
    # estimate it as well as all of them, and it costs half of the statistics pass.
    histogram_tokens: int = 16384
    refit_output: bool = True
    shard_bytes: int = DEFAULT_SHARD_BYTES
    revision: str | None = None


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

    def cache_summary(self) -> dict:
        nbytes = torch.finfo(self.dtype).bits // 8
        src = self.spec.kv_elements_per_token_layer()
        new = self.shape.kv_elements_per_token_layer()
        return {
            "source_elements_per_token_layer": src,
            "converted_elements_per_token_layer": new,
            "source_bytes_per_token": src * nbytes * self.spec.layers,
            "converted_bytes_per_token": new * nbytes * self.spec.layers,
            "reduction_percent": round(100 * (1 - new / src), 2),
        }

    def describe(self) -> str:
        """The plan a user reads before the first layer (and all that --dry-run prints)."""
        spec, shape, cost, kv = self.spec, self.shape, self.cost, self.cache_summary()
        out = str(self.dtype).removeprefix("torch.")
        lines = [
            f"plan: {self.source} ({spec.model_type}, {spec.layers} layers, hidden {spec.hidden}, {spec.heads} q / "
            f"{spec.kv_heads} kv heads of {spec.head_dim}, vocab {spec.vocab}, stored as "
            f"{str(self.reader.dtype()).removeprefix('torch.')}); every weight's shape matches config.json",
            f"  output: kv_lora_rank {shape.kv_lora_rank}, rope dim {shape.qk_rope}, (qk_nope, qk_rope, v) = "
            f"({shape.qk_nope}, {shape.qk_rope}, {shape.v_head}), {out}, rope strategy "
            f"{self.strategies[0] if len(self.strategies) == 1 else 'chosen among ' + ', '.join(self.strategies)}, "
            f"{self.latent} latent"
            + (" (one more pass over the calibration text, counted below)" if self.latent == "native" else ""),
            f"  KV cache per token: {kv['source_elements_per_token_layer']} -> "
            f"{kv['converted_elements_per_token_layer']} elements per layer, {kv['source_bytes_per_token']} -> "
            f"{kv['converted_bytes_per_token']} bytes over all layers in {out} (-{kv['reduction_percent']}%)",
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


def default_rank(spec: SourceSpec, rope_dim: int) -> int:
    """512 (the fast kernels' size) when the source can fill it, else the largest power of two
    that halves the source's cache."""
    most = 2 * spec.kv_heads * spec.head_dim - rope_dim
    if most >= 512:
        return 512
    half = spec.kv_elements_per_token_layer() // 2 - rope_dim
    return 2 ** int(math.log2(max(half, 1)))


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
    folder = resolve_model(source, opts.revision)
    spec = load_spec(folder)
    d, r = spec.head_dim, opts.rope_dim
    if r > d:
        raise MlakitError(f"--rope-dim {r} is larger than the source's head_dim {d}; use at most {d}")
    if r < 2 or r % 2 or (d // 2) % (r // 2):
        raise MlakitError(
            f"--rope-dim {r}: must be even and its half must divide the {d // 2} source frequencies (e.g. {d // 2})"
        )
    most = 2 * spec.kv_heads * d - r
    positive("--kv-lora-rank", opts.kv_lora_rank, "the rank")
    rank = opts.kv_lora_rank or default_rank(spec, r)
    if rank > most:
        raise MlakitError(
            f"--kv-lora-rank {rank}: this source can fill at most {most} (2 * {spec.kv_heads} kv heads * {d} - "
            f"rope dim {r}); choose a smaller rank"
        )
    qk_nope, v_head = deepseek.head_dims(d)
    shape = deepseek.MLAShape(spec.hidden, spec.heads, qk_nope, r, v_head, rank)
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
    cost = estimate(_work(spec, shape, strategies, DTYPES[opts.dtype], reader, opts))
    plan = Plan(source, folder, spec, shape, strategies, DTYPES[opts.dtype], reader, cost, opts.latent)
    if not opts.kv_lora_rank:
        plan.notes.append(f"kv_lora_rank defaults to {rank} for this source")
    if shape.kv_elements_per_token_layer() >= spec.kv_elements_per_token_layer():
        plan.notes.append("warning: the MLA cache is not smaller than the source's; lower --kv-lora-rank")
    plan.notes += [f"warning: {rule} not met: {detail}" for rule, ok, detail in deepseek.kernel_notes(shape) if not ok]
    rope_type = spec.rope.get("rope_type", "default")
    if rope_type == "linear" or (rope_type == "llama3" and opts.llama3_rope == "keep"):
        plan.notes.append(f"warning: {rope_type} rope scaling is exact in transformers; vLLM and SGLang apply YaRN")
    return plan


def _work(spec: SourceSpec, shape: deepseek.MLAShape, strategies: list[str], dtype: torch.dtype,
          reader: CheckpointReader, opts: ConvertOptions) -> Work:
    """What `pipeline.convert` will do with these options, in the terms of the cost model."""
    rows = opts.calib_tokens // opts.calib_seq_len
    probe = max(1, min(rows, opts.strategy_tokens // opts.calib_seq_len)) if len(strategies) > 1 else 0
    head = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
    text = sum(Path(p).stat().st_size for p in opts.calib_text or [DEFAULT_TEXT] if Path(p).is_file())
    return Work(spec, shape, out_dtype=dtype, embed=reader.info("model.embed_tokens.weight"),
                head=reader.info(head), layer_dtype=reader.dtype(), rows=rows, seq_len=opts.calib_seq_len,
                histogram_tokens=opts.histogram_tokens, candidates=len(strategies), probe_rows=probe,
                device=opts.device, text_bytes=text, native=opts.latent == "native")
