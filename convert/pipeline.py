"""Stream a planned conversion (`plan.py`) one layer at a time, each layer's attention written as
MLA by `attention.py` for the rope candidates of `candidates.py`.

Calibration hidden states are carried through the source layers by the layer stream
(`core/stream.py`, as GPTQ does): each layer is read, measured on its inputs, converted, written,
and run to produce the next layer's inputs, so memory holds one layer plus the calibration
activations. The latent format
(exact or native, `core/latent.py`) and any zero padding of the latent to an engine's width are
applied to each layer as it is written: one pass, one output folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

import mlakit
from mlakit.convert.calibration import CalibrationSet, calibration_set, describe
from mlakit.convert.attention import convert_attention, padded_columns, unpadded
from mlakit.convert.candidates import Candidate, candidate
from mlakit.convert.factorize import LeastSquares, SecondMoment
from mlakit.convert.plan import ConvertOptions, Plan, make_plan, value_dim
from mlakit.core import latent
from mlakit.core.deepseek import LATENT_NORM_EPS
from mlakit.core.checkpoint import CheckpointReader, ShardWriter, copy_side_files, resolve_model, write_json
from mlakit.core.errors import MlakitError
from mlakit.core.families import layer_name
from mlakit.core.forward import (
    MLAWeights,
    attention_distance_histogram,
    linear,
    mla_attention,
    mla_heads,
    rope_tables,
    source_qkv,
)
from mlakit.core.guard import atomic_folder, check_output, local_model, output_lock, record_id
from mlakit.core.precision import run_dtype
from mlakit.core.sampling import SampleSettings
from mlakit.core.stream import LayerStream, Rows, SourceModel, StreamLayer

FIT, HELD = "fit", "held"  # the calibration set's fitting and held-out rows


def _stream(plan: Plan, reader: CheckpointReader, calib: CalibrationSet, cands: list[Candidate],
            opts: ConvertOptions, writer: ShardWriter | None, desc: str,
            log: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """Carry calibration hidden states through the model (`LayerStream`), converting each layer for
    every candidate; write the (single) candidate's layers when a writer is given. Statistics and fits
    use the calibration set's fitting rows; its held-out rows only judge the choices and the errors.

    The hidden states are the source's (teacher-forced): fitting each layer on the converted
    layers' hidden states instead was measured worse on a real model (docs/real-models.md).
    One line per layer goes to `log` when stderr is not a terminal, so that logs show progress."""
    spec, dev = plan.spec, opts.device
    windows = calib.windows
    seq_len = windows.shape[1]
    source = SourceModel(spec, reader, seq_len, dev)
    parts = {FIT: Rows(windows[:calib.fit_rows])}
    if calib.held_out:
        parts[HELD] = Rows(windows[calib.fit_rows:])
    stream = LayerStream(source, parts, max(spec.intermediate, spec.hidden), mlp_dtype=run_dtype(dev, reader.dtype()))
    if writer:
        writer.add("model.embed_tokens.weight", reader.get("model.embed_tokens.weight").to(plan.dtype))
    tables = {"source": (source.cos, source.sin),
              **{c.strategy: tuple(t.to(dev) for t in rope_tables(c.tgt_freq, seq_len)) for c in cands}}
    reports: dict[str, list[dict]] = {c.strategy: [] for c in cands}
    native = writer is not None and plan.latent == "native"
    bar = tqdm(stream, total=spec.layers, desc=desc, unit="layer", leave=False, disable=None)
    for step in bar:
        i = step.index
        weights, input_gamma, seconds = _convert_layer(plan, step, tables, cands, opts, reports, native)
        if writer:
            start = time.perf_counter()
            _write_layer(writer, reader, plan, i, weights, input_gamma)
            seconds["write"] = time.perf_counter() - start
        for c in cands:
            reports[c.strategy][-1]["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        if log and bar.disable:
            row = reports[cands[0].strategy][-1]
            log(f"{desc}: layer {i + 1}/{spec.layers} in {sum(seconds.values()):.1f} s, attention error "
                f"{row['attn_rel_error']:.4f} (held out {_fmt(row['attn_rel_error_held_out'])}), latent error "
                f"{row['latent_error']:.4f}"
                + (f", native latent against exact {row['native_error']:.4f}" if native else ""))
    return reports


def _convert_layer(plan: Plan, step: StreamLayer, tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   cands: list[Candidate], opts: ConvertOptions, reports: dict[str, list[dict]],
                   native: bool = False) -> tuple[MLAWeights, torch.Tensor, dict[str, float]]:
    """Convert the stream's layer for every candidate (rope step and latent from the fitting rows'
    statistics, then o_proj refitted by least squares to the source attention's output, with the
    ridge, or no refit, that does best on the held-out rows), append their reports, advance the
    stream, and return the first candidate's weights (plain, or with `native` in the native latent
    format, `_native_layer`), the layer's input norm and the seconds each part took.

    A function of its own so that the source layer and the unchosen weights are freed before the
    next layer is read: peak memory is one layer's, whatever the depth."""
    spec, shape, dev, stream = plan.spec, plan.shape, opts.device, step.stream
    cos, sin = tables["source"]
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[part] = seconds.get(part, 0.0) + now - clock
        clock = now

    layer = step.source
    stats = SecondMoment(spec.hidden, dev)
    seq_len = stream.hidden(FIT).shape[1]
    dist = torch.zeros(spec.heads, seq_len, dtype=torch.float64, device=dev) if opts.expected_rotation else None
    lap("read")
    with torch.no_grad():
        for c in stream.chunks(FIT):
            x = step.normed(FIT, c)
            stats.update(x)
            rows = min(c.stop, max(1, opts.histogram_tokens // seq_len)) - c.start
            if dist is not None and rows > 0:
                q, k, _ = source_qkv(x[:rows], layer, spec, cos, sin)
                dist += attention_distance_histogram(q, k, spec)
                del q, k
        targets = {part: step.target(part) for part in stream.parts}  # what the fit aims at
        lap("statistics")
        built = {c.strategy: convert_attention(layer, spec, shape, stats, dist, c, opts) for c in cands}
        v_dim = value_dim(spec, shape, opts)
        on_device = {key: MLAWeights(*(t.to(dev) for t in vars(unpadded(w, spec, shape, v_dim)).values()))
                     for key, (w, _) in built.items()}
        lap("rope and latent")
        n = spec.heads * v_dim
        fits = {key: {part: LeastSquares(n, spec.hidden, dev) for part in (FIT, HELD)} for key in built}
        for part, target in targets.items():
            for c in stream.chunks(part):
                x = step.normed(part, c)
                for key, w in on_device.items():
                    heads = mla_heads(x, w, spec.heads, spec.head_dim, shape.qk_rope, v_dim, *tables[key],
                                      norm_eps=None, scale=shape.qk_head**-0.5)
                    fits[key][part].update(heads, target[c])
        del targets
        chosen = {key: _choose_output(fit[FIT], fit[HELD], on_device[key].o, opts) for key, fit in fits.items()}
        for c in cands:
            o, row = chosen[c.strategy]
            weights, info = built[c.strategy]
            if row["output_refit"]:
                weights.o = padded_columns(o, spec, shape, v_dim).float().cpu()
            reports[c.strategy].append({"layer": step.index, **row, **info})
        lap("error pass")
        result = built[cands[0].strategy][0]
        if native:
            result, reports[cands[0].strategy][-1]["native_error"] = _native_layer(
                plan, result, step, tables[cands[0].strategy], opts)
            lap("native latent")
        step.advance()
        lap("next inputs")
    return result, layer.input_norm.cpu(), seconds


def _native_layer(plan: Plan, w: MLAWeights, step: StreamLayer, rope: tuple[torch.Tensor, torch.Tensor],
                  opts: ConvertOptions) -> tuple[MLAWeights, float]:
    """Plain weights `w` in the native latent format (`latent.fit_native` on the latents of the fitting
    rows), and the relative error of its attention output, as stored in the output dtype, against the
    exact format's on the held-out rows (the fitting rows when none are held out)."""
    spec, shape, dev, stream = plan.spec, plan.shape, opts.device, step.stream
    plain = MLAWeights(*(t.to(dev) for t in vars(w).values()))
    rank = shape.kv_lora_rank
    native = latent.fit_native(plain, [linear(step.normed(FIT, c), plain.kv_a[:rank]) for c in stream.chunks(FIT)],
                               opts.native_metric_steps, seed=step.index)
    stored = MLAWeights(*(t.to(plan.dtype).float() for t in vars(native).values()))
    v_dim = value_dim(spec, shape, opts)
    exact, served = unpadded(plain, spec, shape, v_dim), unpadded(stored, spec, shape, v_dim)
    judge = HELD if HELD in stream.parts else FIT
    err = energy = 0.0
    for c in stream.chunks(judge):
        x = step.normed(judge, c)
        run = lambda m, eps: mla_attention(x, m, spec.heads, spec.head_dim, shape.qk_rope, v_dim,  # noqa: E731
                                           *rope, norm_eps=eps, scale=shape.qk_head**-0.5)
        ref = run(exact, None)
        err += (run(served, LATENT_NORM_EPS) - ref).pow(2).sum().item()
        energy += ref.pow(2).sum().item()
    return MLAWeights(*(t.cpu() for t in vars(native).values())), math.sqrt(err / max(energy, 1e-300))


def _choose_output(fit: LeastSquares, held: LeastSquares, prior: torch.Tensor,
                   opts: ConvertOptions) -> tuple[torch.Tensor, dict]:
    """o_proj as converted or refitted with a ridge of `opts.refit_ridges`, whichever has the least error
    on the held-out rows. That error has one minimum in the ridge (too small fits the calibration rows'
    noise, too large stays at the converted o_proj), so the ladder is walked from `opts.refit_ridge`
    towards the side that improves and stopped at the first step that does not: three solves where
    the best ridge is inside the ladder. Without held-out rows only `opts.refit_ridge` is tried
    (in-sample, a refit always wins and a smaller ridge always looks better). Returns it and its
    report: relative attention errors on both parts, and the ridge (None: not refitted)."""
    judge = held if held.count else fit
    best = {"ridge": None, "o": prior, "error": judge.error(prior)}

    def attempt(ridge: float) -> float:
        refit = fit.solve(prior, ridge)  # one refit beside the best: each is n_out x n_in in float64
        error = judge.error(refit)
        if error < best["error"]:
            best.update(ridge=ridge, o=refit, error=error)
        return error

    if opts.refit_output:
        ladder = opts.ridge_ladder if held.count else [opts.refit_ridge]
        i = ladder.index(opts.refit_ridge)
        errors = {i: attempt(ladder[i])}
        for step in (1, -1):
            j = i + step
            while 0 <= j < len(ladder):
                errors[j] = attempt(ladder[j])
                if errors[j] >= errors[j - step]:
                    break
                j += step
            if errors.get(i + step, math.inf) < errors[i]:
                break  # it improved upwards: the other side is past the minimum
    o = best["o"]
    return o, {"attn_rel_error": fit.relative_error(o),
               "attn_rel_error_held_out": held.relative_error(o) if held.count else None,
               "output_refit": best["ridge"] is not None, "refit_ridge": best["ridge"]}


def _write_layer(writer: ShardWriter, reader: CheckpointReader, plan: Plan, i: int, w: MLAWeights,
                 input_gamma: torch.Tensor) -> None:
    """Layer i in the plan's latent format, its latent zero-padded to the plan's padded rank if any."""
    tensors = latent.format_attention(i, w, input_gamma, plan.spec.hidden, native=plan.latent == "native")
    for key in ("gate", "up", "down", "input_norm", "post_norm"):
        tensors[layer_name(i, key)] = reader.get(layer_name(i, key))
    if plan.padded_rank:
        tensors = latent.pad_latent(tensors, i, plan.padded_rank)
    for name, t in tensors.items():
        writer.add(name, t.to(plan.dtype))


def _revision(folder: Path) -> str | None:
    """The commit a hub snapshot folder was downloaded at."""
    return folder.name if folder.parent.name == "snapshots" else None


def convert(source: str, out: Path, opts: ConvertOptions, force: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Convert SOURCE into a DeepSeek-V3 MLA folder at OUT, holding OUT's lock for the run; return the
    mlakit.json record."""
    check_output(out, force, protect=[local_model(source)])
    with output_lock(out):
        return _convert(record_id(source), out, opts, force, log)


def _convert(source: str, out: Path, opts: ConvertOptions, force: bool, log: Callable[[str], None]) -> dict:
    plan = make_plan(source, opts)
    log(plan.describe())
    reader = plan.reader
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.folder)
    except Exception as exc:  # tokenizer loading raises many types
        raise MlakitError(f"{plan.folder}: cannot load the tokenizer ({exc})") from exc
    calib = calibration_windows(plan.folder, tokenizer, opts, log)
    cands = {s: candidate(plan, s, opts.llama3_rope) for s in plan.strategies}
    choice = {}
    if len(cands) > 1:
        probe = _stream(plan, reader, calib.first(max(1, opts.strategy_tokens // opts.calib_seq_len)),
                        list(cands.values()), opts, None, "choosing rope budget")
        choice = {s: _rms_error(rep) for s, rep in probe.items()}
        best = min(choice, key=choice.get)
        log("rope budget (attention error on held-out calibration windows, root mean square over layers): "
            + ", ".join(f"{s} {e:.4g}" for s, e in choice.items()) + f" -> {best}")
    else:
        best = plan.strategies[0]
    cand = cands[best]
    with atomic_folder(out, force, protect=[plan.folder]) as tmp:
        writer = ShardWriter(tmp, opts.shard_bytes)
        layers = _stream(plan, reader, calib, [cand], opts, writer, "converting", log)[best]
        writer.add("model.norm.weight", reader.get("model.norm.weight").to(plan.dtype))
        head = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
        writer.add("lm_head.weight", reader.get(head).to(plan.dtype))
        writer.close()
        write_json(tmp / "config.json", {**cand.config, "kv_lora_rank": plan.served_shape.kv_lora_rank})
        copy_side_files(plan.folder, tmp)
        record = {
            "mlakit_version": mlakit.__version__,
            "source": {"id": source, "revision": opts.revision or _revision(plan.folder),
                       "model_type": plan.spec.model_type, "dtype": str(reader.dtype()).removeprefix("torch.")},
            "shape": plan.served_shape.as_dict(),
            "kv_cache": plan.cache_summary(),
            "dtype": opts.dtype,
            "latent": {"format": plan.latent,
                       **({"metric_steps": opts.native_metric_steps} if plan.latent == "native" else {})},
            "rope": {"strategy": best, "rope_parameters": cand.config["rope_parameters"],
                     "max_relative_frequency_error": cand.freq_error,
                     "complex_pca": opts.complex_pca, "expected_rotation": opts.expected_rotation,
                     "strategy_errors": choice},
            "factorization": {"activation_aware": opts.activation_aware, "output_aware": opts.output_aware,
                              "balance_kv": opts.balance, "key_weight": opts.key_weight, "shrink": opts.moment_shrink,
                              "refit_ridges": opts.ridge_ladder if opts.refit_output else [],
                              "value_dims": value_dim(plan.spec, plan.shape, opts)},
            "calibration": calib.record,
            "layers": layers,
        }
        if plan.padded_rank:
            record["latent_padding"] = {"filled": plan.shape.kv_lora_rank, "kv_lora_rank": plan.padded_rank}
        write_json(tmp / "mlakit.json", record)
    return record


def calibration_windows(folder: Path, tokenizer, opts: ConvertOptions,
                        log: Callable[[str], None] | None = None) -> CalibrationSet:
    """The calibration set these options describe (every pass over the model uses the same one)."""
    return calibration_set(folder, tokenizer, text=opts.calib_text, mix=opts.calib_mix, tokens=opts.calib_tokens,
                           seq_len=opts.calib_seq_len, bos=opts.calib_bos,
                           sampling=SampleSettings(opts.calib_seq_len, opts.calib_temperature, opts.calib_seed),
                           held_out=opts.held_out, device=opts.device, log=log)


def calibration_for(source: str, opts: ConvertOptions) -> CalibrationSet:
    """The calibration set a conversion of SOURCE with these options uses; sampled windows come from
    the cache that the conversion filled."""
    folder = resolve_model(source, opts.revision)
    return calibration_windows(folder, AutoTokenizer.from_pretrained(folder), opts)


def _rms_error(layers: list[dict]) -> float:
    """The layers' attention errors in one number (held out where there is a held-out part), each
    layer weighted as its squared error."""
    return math.sqrt(sum((l["attn_rel_error_held_out"] if l["attn_rel_error_held_out"] is not None
                          else l["attn_rel_error"]) ** 2 for l in layers) / len(layers))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def summary(record: dict) -> str:
    """The table a user reads after a conversion."""
    kv, shape = record["kv_cache"], record["shape"]
    lines = [
        f"KV cache per token per layer: {kv['source_elements_per_token_layer']} -> "
        f"{kv['converted_elements_per_token_layer']} elements "
        f"(kv_lora_rank {shape['kv_lora_rank']} + rope {shape['qk_rope']}), "
        f"{kv['source_bytes_per_token']} -> {kv['converted_bytes_per_token']} bytes per token in {record['dtype']} "
        f"over all layers, {-kv['reduction_percent']:+}%",
        f"rope budget: {record['rope']['strategy']} (worst relative frequency error "
        f"{record['rope']['max_relative_frequency_error']:.2g}); calibration: {describe(record['calibration'])}",
        "layer  attention error  held out  o_proj refit  K err   V err   latent err  rank-r optimum  rope energy kept",
    ]
    for row in record["layers"]:
        refit = f"ridge {row['refit_ridge']:g}" if row["output_refit"] else "no"
        lines.append(
            f"{row['layer']:>5}  {row['attn_rel_error']:15.4f}  {_fmt(row['attn_rel_error_held_out']):>8}  "
            f"{refit:>12}  {row['k_error']:6.4f}  {row['v_error']:6.4f}  "
            f"{row['latent_error']:10.4f}  {row['latent_optimum']:14.4f}  {row['rope_energy_kept']:16.4f}"
        )
    if record["latent"]["format"] == "native":
        errors = [row["native_error"] for row in record["layers"]]
        lines.append(f"native latent: kv_b_proj refitted to the normalized latent; attention error against the "
                     f"exact format {sum(errors) / len(errors):.4f} mean, {max(errors):.4f} worst layer")
    if "latent_padding" in record:
        pad = record["latent_padding"]
        lines.append(f"latent zero-padded from {pad['filled']} to kv_lora_rank {pad['kv_lora_rank']} (exact): the "
                     f"cache holds {kv['converted_elements_per_token_layer']} elements per token and layer, the "
                     f"source's {kv['source_elements_per_token_layer']}")
    return "\n".join(lines)
