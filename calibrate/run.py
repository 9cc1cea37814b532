"""`mlakit calibrate`: check everything that can be checked, then run layer-wise fitting, distillation
or both, and write OUT only when complete."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

import mlakit
from mlakit.calibrate.checkpoint import STAGE, check_resume, create, remove, resume_hint
from mlakit.calibrate.data import Packed, default_set, hold_out, load_documents, pack, sample_settings, spread
from mlakit.calibrate.distill import TRAIN, Checkpoints, DistillOptions, distill
from mlakit.calibrate.export import keep_better, load_mla_config, worse_warning
from mlakit.calibrate.layers import Student
from mlakit.calibrate.layerwise import INPUTS, LayerProgress, LayerwiseOptions, calibrate_layerwise
from mlakit.core.checkpoint import Export, read_json, resolve_model
from mlakit.core.errors import MlakitError
from mlakit.core.guard import (
    DEMO_DIR,
    RECORD,
    atomic_folder,
    check_output,
    check_protected,
    output_lock,
    record_id,
    scratch_folder,
)
from mlakit.core.metrics import Quality
from mlakit.core.stream import SourceModel
from mlakit.core.text import DEFAULT_TEXT

MODES = ("layerwise", "distill", "both")
DEFAULT_DATA_WARNING = ("warning: no --data, so calibrating on convert's default set (text sampled from the teacher, "
                        "cached, and the bundled mix of prose, code and fifteen languages): calibration moves the "
                        "model towards its data, so pass --data with text "
                        "like what the model will serve")


@dataclass
class CalibrateOptions:
    """Every knob of a calibration run; the CLI fills it from flags."""

    mode: str = "layerwise"
    teacher: str | None = None
    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokens: int = 131072
    eval_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str | None = None
    layerwise: LayerwiseOptions = field(default_factory=LayerwiseOptions)
    distill: DistillOptions = field(default_factory=DistillOptions)


@dataclass
class Outcome:
    """What the summary prints: held-out quality after each stage."""

    data: str
    held_out_tokens: int
    qualities: list[tuple[str, Quality]]
    notes: list[str]


def _check_options(opts: CalibrateOptions) -> None:
    if opts.mode not in MODES:
        raise MlakitError(f"--mode {opts.mode}: choose one of {', '.join(MODES)}")
    if opts.layerwise.inputs not in INPUTS:
        raise MlakitError(f"--inputs {opts.layerwise.inputs}: choose one of {', '.join(INPUTS)}")
    if opts.distill.train not in TRAIN:
        raise MlakitError(f"--train {opts.distill.train}: choose one of {', '.join(TRAIN)}")
    if opts.seq_len < 16 or opts.tokens < opts.seq_len:
        raise MlakitError("--tokens must be at least --seq-len, which must be at least 16")
    if opts.eval_tokens < opts.seq_len:
        raise MlakitError(f"--eval-tokens {opts.eval_tokens}: the held-out rows are whole rows of --seq-len "
                          f"{opts.seq_len} tokens; give at least {opts.seq_len}")
    if min(opts.batch_size, opts.layerwise.batch_rows, opts.distill.save_every) < 1 \
            or min(opts.layerwise.steps, opts.distill.teacher_topk) < 0:
        raise MlakitError("--batch-size, --layer-batch and --save-every must be positive, "
                          "--layer-steps and --teacher-topk not negative")
    if not (opts.distill.lr > 0 and opts.layerwise.lr > 0):
        raise MlakitError(f"--lr {opts.distill.lr:g} / --layer-lr {opts.layerwise.lr:g}: learning rates must be "
                          "positive")
    if opts.mode != "distill" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MlakitError(
            f"--mode {opts.mode} runs in one process: run it without accelerate launch, then distill its output "
            "with accelerate launch ... --mode distill"
        )
    if opts.device and opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise MlakitError("--device cuda: no CUDA device is available; use --device cpu")


def _teacher_id(converted: Path, given: str | None) -> tuple[str, str | None]:
    """--teacher, or the source recorded by mlakit convert."""
    if given:
        return given, None
    source = read_json(converted / RECORD).get("source", {}) if (converted / RECORD).is_file() else {}
    if not source.get("id"):
        raise MlakitError(f"{converted}: no {RECORD} names the source model; pass --teacher")
    return source["id"], source.get("revision")


def _tokenizer(teacher: Path, converted: Path):
    """The teacher's tokenizer, after checking that the student shares it and its vocabulary size."""
    t_vocab = AutoConfig.from_pretrained(teacher).vocab_size
    s_vocab = read_json(converted / "config.json").get("vocab_size")
    if t_vocab != s_vocab:
        raise MlakitError(f"teacher vocab_size {t_vocab} differs from the student's {s_vocab}; use the source model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
    except Exception as exc:  # tokenizer loading raises many types
        raise MlakitError(f"{teacher}: cannot load the tokenizer ({exc})") from exc
    if any(converted.glob("tokenizer*")):
        try:
            student_vocab = AutoTokenizer.from_pretrained(converted).get_vocab()
        except Exception as exc:  # tokenizer loading raises many types
            raise MlakitError(f"{converted}: cannot load the tokenizer ({exc})") from exc
        if student_vocab != tokenizer.get_vocab():
            differ = len(set(student_vocab.items()) ^ set(tokenizer.get_vocab().items()))
            raise MlakitError(f"teacher and student tokenizers differ ({differ} vocabulary entries); use the source model")
    return tokenizer


def _check_layerwise_pair(teacher: SourceModel, student: Student) -> None:
    t, c = teacher.spec, student.config
    pairs = {"layers": (t.layers, c.num_hidden_layers), "hidden size": (t.hidden, c.hidden_size),
             "heads": (t.heads, c.num_attention_heads)}
    for what, (a, b) in pairs.items():
        if a != b:
            raise MlakitError(f"layer-wise calibration needs the model CONVERTED was made from as teacher: "
                              f"teacher {what} {a}, student {b}")


def calibrate(converted_id: str, out: Path, opts: CalibrateOptions, force: bool = False,
              log: Callable[[str], None] = print) -> Outcome | None:
    """Calibrate CONVERTED into OUT; return the held-out summary (None on other than the main process)."""
    _check_options(opts)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    converted = resolve_model(converted_id)
    load_mla_config(converted)
    teacher_id, revision = _teacher_id(converted, opts.teacher)
    teacher = resolve_model(teacher_id, revision)
    check_output(out.resolve(), force, protect=[converted, teacher])
    with output_lock(out):
        return _calibrate(converted_id, converted, teacher_id, teacher, out, opts, device, force, log)


def _calibrate(converted_id: str, converted: Path, teacher_id: str, teacher: Path, out: Path, opts: CalibrateOptions,
               device: str, force: bool, log: Callable[[str], None]) -> Outcome | None:
    tokenizer = _tokenizer(teacher, converted)
    if opts.distill.teacher_topk > len(tokenizer):
        raise MlakitError(f"--teacher-topk {opts.distill.teacher_topk} is larger than the vocabulary ({len(tokenizer)})")
    demo = teacher.resolve() == DEMO_DIR.resolve()
    with scratch_folder(out, "data") as scratch:  # the packed rows, removed however the run ends
        if opts.data or demo:  # the demo's own text is the docstrings
            docs = load_documents(opts.data, opts.text_field, DEFAULT_TEXT)
            pool, held_out = hold_out(pack(tokenizer, docs, opts.seq_len, scratch), opts.eval_tokens)
            data = {"name": docs.name, "sha256": docs.sha256}
        else:
            log(DEFAULT_DATA_WARNING)
            settings = sample_settings(read_json(converted / RECORD) if (converted / RECORD).is_file() else {},
                                       opts.seq_len)
            default = default_set(teacher, tokenizer, opts.tokens, opts.eval_tokens, opts.seq_len, settings, device,
                                  log)
            pool, held_out = default.rows, default.held_out
            data = {"name": default.name, "sha256": default.sha256, **default.record}
        run = {"mlakit_version": mlakit.__version__, "converted": record_id(converted_id),
               "teacher": record_id(teacher_id),
               "data": {**data, "seq_len": opts.seq_len, "held_out_tokens": held_out.tokens}}
        folder = opts.distill.checkpoint_dir or out.resolve().with_name(out.name + ".ckpt")
        check_protected(folder, [converted, teacher, out], "--checkpoint-dir")
        progress = LayerProgress(folder, _layerwise_fingerprint(teacher, converted, data["sha256"], opts)) \
            if opts.mode != "distill" else None
        plan = _distill_plan(replace(opts, device=device), folder, teacher, data["sha256"], run) \
            if opts.mode != "layerwise" else None
        saved = [progress and progress.saved(), plan and Checkpoints(folder, plan[1]).saved()]
        check_resume(folder, [s for s in saved if s], opts.distill.resume, force)
        qualities, notes = [], []
        if opts.mode == "layerwise":
            create(folder)
            with atomic_folder(out, force) as tmp:
                qualities += _layerwise(teacher, converted, tmp, pool, held_out, opts, device, run, progress, notes,
                                        log)
            remove(folder)
            return Outcome(data["name"], held_out.tokens, qualities, notes)
        start = converted
        if opts.mode == "both":
            start = folder / STAGE
            if opts.distill.resume and (start / RECORD).is_file():
                qualities += _finished_stage(start, notes)
            else:
                create(folder)
                with atomic_folder(start, force=True) as tmp:
                    qualities += _layerwise(teacher, converted, tmp, pool, held_out, opts, device, run, progress, notes,
                                            log)
                progress.release()
        distilled = _distill(teacher, start, out, pool, held_out, plan, run, force, notes, log)
        qualities += distilled[1:] if qualities else distilled
        return Outcome(data["name"], held_out.tokens, qualities, notes) if qualities else None


def _layerwise_fingerprint(teacher: Path, converted: Path, data: str, opts: CalibrateOptions) -> dict:
    """What the layers of a layer-wise stage depend on: a resume must match every entry."""
    lw = opts.layerwise
    return {"teacher": str(teacher.resolve()), "converted": str(converted.resolve()), "data": data,
            "seq_len": opts.seq_len, "tokens": opts.tokens, "eval_tokens": opts.eval_tokens, "seed": opts.seed,
            "layer_steps": lw.steps, "layer_lr": lw.lr, "layer_batch": lw.batch_rows, "inputs": lw.inputs}


def _layerwise(teacher_dir: Path, converted: Path, folder: Path, pool: Packed, held_out: Packed,
               opts: CalibrateOptions, device: str, run: dict, progress: LayerProgress, notes: list[str],
               log: Callable[[str], None]) -> list[tuple[str, Quality]]:
    """The layer-wise stage into `folder`; finished layers are kept in `progress` until it is complete."""
    teacher = SourceModel.load(teacher_dir, opts.seq_len, device)
    student = Student(converted, opts.seq_len, device)
    _check_layerwise_pair(teacher, student)
    fit_rows = spread(pool, max(1, opts.tokens // opts.seq_len))
    lw = LayerwiseOptions(**{**asdict(opts.layerwise), "seed": opts.seed, "device": device})
    if not opts.distill.resume:
        progress.clear()
    export = Export(converted, folder)
    try:
        result = calibrate_layerwise(teacher, student, fit_rows, held_out, export, lw, progress, log)
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM as the CLI raises it
        if progress.done():
            resume_hint(f"{progress.path} ({progress.done()} of {student.layers} layers)")
        raise
    del teacher, student  # their float32 output heads, before export.close() copies the untouched tensors
    export.close()
    kept = keep_better(converted, folder, result.before, result.after)
    if kept == "input":
        log(worse_warning("layer-wise calibration", result.before, result.after))
    export.record({**run, "mode": "layerwise", "fit_tokens": fit_rows.tokens, "kept": kept,
                  "options": {k: lw.__dict__[k] for k in ("steps", "lr", "batch_rows", "inputs", "seed")},
                  "before": result.before.as_dict(), "after": result.after.as_dict(), "layers": result.layers,
                  "seconds": round(result.seconds, 1), "resumed_layers": result.resumed_layers})
    worse = [r["layer"] for r in result.layers if r["kept"] == "converted"]
    resumed = f" ({result.resumed_layers} saved by the interrupted run)" if result.resumed_layers else ""
    notes.append(f"layer-wise: {len(result.layers)} layers{resumed} on {fit_rows.tokens} tokens in "
                 f"{result.seconds:.0f} s"
                 + (f"; layers {worse} kept their converted attention (fitting did not lower the error)" if worse
                    else ""))
    return [("converted", result.before), ("layer-wise", result.after)]


def _finished_stage(stage: Path, notes: list[str]) -> list[tuple[str, Quality]]:
    """The layer-wise stage that an interrupted `--mode both` run completed, as its record tells."""
    record = read_json(stage / RECORD)["calibrate"][-1]
    notes.append(f"layer-wise: {len(record['layers'])} layers on {record['fit_tokens']} tokens, done by the "
                 "interrupted run")
    return [("converted", Quality(**record["before"])), ("layer-wise", Quality(**record["after"]))]


def _distill_plan(opts: CalibrateOptions, folder: Path, teacher: Path, data: str, run: dict) -> tuple:
    """Distillation options, the run fingerprint that a resume must match, and the options recorded."""
    d = opts.distill
    dopts = DistillOptions(**{**asdict(d), "tokens": opts.tokens, "batch_size": opts.batch_size, "seed": opts.seed,
                              "device": opts.device, "checkpoint_dir": folder})
    options = {"tokens": opts.tokens, "seq_len": opts.seq_len, "batch_size": opts.batch_size, "lr": d.lr,
               "train": d.train, "lm_weight": d.lm_weight, "seed": opts.seed, "teacher_topk": d.teacher_topk,
               "precision": d.precision}
    # the starting point is named by what made it, so that `--mode both --resume` matches its checkpoints
    fingerprint = {"teacher": str(teacher.resolve()), "converted": str(resolve_model(run["converted"]).resolve()),
                   "mode": opts.mode, "layerwise": asdict(opts.layerwise) if opts.mode == "both" else None,
                   "data": data, **options}
    # recomputing activations changes memory, not the result: a run may resume with it switched
    return dopts, fingerprint, {**options, "checkpointing": d.checkpointing}


def _distill(teacher_dir: Path, converted: Path, out: Path, pool: Packed, held_out: Packed, plan: tuple,
             run: dict, force: bool, notes: list[str], log: Callable[[str], None]) -> list[tuple[str, Quality]]:
    dopts, fingerprint, options = plan
    result = distill(teacher_dir, converted, out, pool, held_out, dopts, fingerprint,
                     {**run, "mode": "distill", "options": options}, force, log)
    if result.before is None:
        return []
    if result.kept == "input":
        log(worse_warning("distillation", result.before, result.after))
    if result.teacher_tail_mass is not None:
        notes.append(f"cached teacher: its top {dopts.teacher_topk} tokens hold "
                     f"{100 * (1 - result.teacher_tail_mass):.2f}% of its probability on average")
    return [("converted", result.before), ("distilled", result.after)]


def summary(outcome: Outcome) -> str:
    """The table a user reads after a calibration."""
    teacher = outcome.qualities[0][1]
    lines = [f"held-out quality on {outcome.held_out_tokens} tokens of {outcome.data}:",
             f"{'model':<12} {'perplexity':>10} {'vs teacher':>10} {'KL to teacher':>14}",
             f"{'teacher':<12} {teacher.teacher_ppl:>10.3f} {'':>10} {'':>14}"]
    for name, q in outcome.qualities:
        lines.append(f"{name:<12} {q.student_ppl:>10.3f} {100 * (q.student_ppl / q.teacher_ppl - 1):>+9.2f}% "
                     f"{q.kl:>14.5f}")
    top_k = {q.kl_top_k for _, q in outcome.qualities} - {0}
    if top_k:
        lines.append(f"(KL over the cached teacher's top {top_k.pop()} tokens plus one bucket for the rest: "
                     "a lower bound of the full KL)")
    return "\n".join([*outcome.notes, *lines])
