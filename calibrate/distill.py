"""Distillation: train the converted model end to end on KL(teacher || student) next-token distributions.

Runs through accelerate, so `accelerate launch -m mlakit calibrate ...` trains data-parallel with
DDP, or on GPUs with FSDP (the config `fsdp.yaml` beside this file), unchanged; on GPUs it uses bf16
autocast and gradient checkpointing. The student is trained in the plain parametrization (no latent
norm, see export.py) and written back in the format.
The data order is a pure function of the seed and the step, so a checkpoint (model, optimizer,
scheduler, RNG states, step) restores the exact run: N steps, a resume, N more steps give the
weights of 2N steps in one run.
"""

from __future__ import annotations

import gc
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DeepseekV3ForCausalLM, get_cosine_schedule_with_warmup

from mlakit.calibrate.checkpoint import CACHE, STEPS, create, remove, resume_hint
from mlakit.calibrate.data import Packed
from mlakit.calibrate.export import keep_better
from mlakit.calibrate.teacher import CachedTeacher, LiveTeacher, build_cache, cache_fingerprint, load_teacher, logits
from mlakit.core.checkpoint import CheckpointReader, Export, read_json, write_json
from mlakit.core.deepseek import attention_names
from mlakit.core.latent import format_attention, latent_is_linear, plain_latent
from mlakit.core.errors import MlakitError
from mlakit.core.forward import MLAWeights
from mlakit.core.guard import atomic_folder, writing
from mlakit.core.metrics import IGNORE, Quality, QualityMeter, next_token_labels
from mlakit.core.precision import run_dtype

TRAIN = ("attention", "all")
STATE = "mlakit_state.json"
WARMUP_FRACTION = 0.05
PROGRESS_LINES = 20  # lines per run that report training progress when stderr is not a terminal


@dataclass
class DistillOptions:
    tokens: int = 131072
    # 1e-4 raised the held-out KL of SmolLM2-135M at half the cache, 2e-5 lowered it at half and at a
    # quarter (docs/real-models.md)
    lr: float = 2e-5
    batch_size: int = 8
    train: str = "attention"
    lm_weight: float = 0.0
    save_every: int = 200
    checkpoint_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    teacher_topk: int = 0
    precision: str = "auto"  # auto, bf16 or fp32 (`precision`)
    checkpointing: str = "auto"  # auto (on GPUs), on or off: recompute activations in the backward pass


@dataclass
class DistillResult:
    before: Quality | None
    after: Quality | None
    steps: int
    tokens_per_second: float
    final_loss: float
    seconds: float
    peak_memory_gib: float | None
    teacher_tail_mass: float | None
    precision: str  # "bf16" autocast over float32 weights, or "fp32"
    teacher_dtype: str
    kept: str = "calibrated"


def to_plain(model: DeepseekV3ForCausalLM) -> None:
    """Fold every exact-format kv_a_layernorm into its latent rows and drop the norm (see export.py);
    native-format layers keep theirs."""
    rank, hidden = model.config.kv_lora_rank, model.config.hidden_size
    for layer in model.model.layers:
        attn = layer.self_attn
        w = attn.kv_a_proj_with_mqa.weight
        if not latent_is_linear(w[:rank].detach(), layer.input_layernorm.weight.detach(), hidden):
            continue
        with torch.no_grad():
            w[:rank] = plain_latent(w[:rank], attn.kv_a_layernorm.weight)
        attn.kv_a_layernorm = torch.nn.Identity()


def formatted_state(state: dict[str, torch.Tensor], config, train: str) -> dict[str, torch.Tensor]:
    """The trained tensors of a state dict after `to_plain`, in the output format (a layer that kept
    its kv_a_layernorm is native)."""
    out = {} if train == "attention" else {k: v for k, v in state.items() if ".self_attn." not in k}
    for i in range(config.num_hidden_layers):
        names = attention_names(i)
        native = names["kv_a_layernorm"] in state
        device = state[names["kv_a_proj_with_mqa"]].device
        norm = state[names["kv_a_layernorm"]].float() if native else torch.ones(config.kv_lora_rank, device=device)
        w = MLAWeights(*(state[names[k]].float() for k in ("q_proj", "kv_a_proj_with_mqa")), norm,
                       *(state[names[k]].float() for k in ("kv_b_proj", "o_proj")))
        gamma = state[f"model.layers.{i}.input_layernorm.weight"].float()
        out.update(format_attention(i, w, gamma, config.hidden_size, native))
    return out


def epoch_order(epoch: int, n_rows: int, seed: int) -> torch.Tensor:
    """The seeded permutation of the fit rows that an epoch reads."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_rows(step: int, batch: int, n_rows: int, seed: int) -> torch.Tensor:
    """Rows of global step `step`: consecutive slices of one seeded permutation per epoch."""
    first = step * batch
    index = torch.arange(first, first + batch)
    epochs = index // n_rows
    rows = torch.empty(batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        rows[mask] = epoch_order(epoch, n_rows, seed)[index[mask] % n_rows]
    return rows


def used_rows(steps: int, batch: int, n_rows: int, seed: int) -> torch.Tensor:
    """Every fit row that `steps` steps read, each once, in the order first read: the first epoch's
    order, cut where training stops (later epochs read the same rows again)."""
    return epoch_order(0, n_rows, seed)[: min(steps * batch, n_rows)]


class Checkpoints:
    """`step-NNNNNNN` folders of accelerate state plus our step and run fingerprint, written last."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = folder
        self.fingerprint = fingerprint

    def latest(self) -> Path | None:
        done = sorted(p for p in self.folder.glob("step-*") if (p / STATE).is_file()) if self.folder.is_dir() else []
        return done[-1] if done else None

    def saved(self) -> tuple[Path, dict, dict] | None:
        """The latest checkpoint, the fingerprint it was saved with and this run's (see check_resume)."""
        last = self.latest()
        return None if last is None else (last, read_json(last / STATE).get("fingerprint", {}), self.fingerprint)

    def clear(self) -> None:
        """Remove the checkpoints of an earlier run; a teacher cache stays, it checks its own fingerprint."""
        for old in (path for pattern in STEPS for path in self.folder.glob(pattern)):
            shutil.rmtree(old)

    def save(self, accelerator, step: int) -> None:
        tmp = self.folder / f".step-{step:07d}.tmp"
        with writing(tmp):
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / STATE, {"step": step, "fingerprint": self.fingerprint})
            tmp.rename(self.folder / f"step-{step:07d}")
            for old in self.folder.glob("step-*"):
                if old.name != f"step-{step:07d}":
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()


def evaluate(teacher: LiveTeacher | CachedTeacher, student, rows: Packed, device: torch.device,
             batch: int) -> Quality:
    """Held-out quality of a stock-loaded student."""
    meter = QualityMeter()
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            index = torch.arange(start, min(start + batch, len(rows)))
            part = rows[index]
            ids, pos = part.input_ids.to(device), part.position_ids.to(device)
            teacher.measure(meter, "held_out", index, ids, pos, logits(student, ids, pos), next_token_labels(ids, pos))
    return meter.result(teacher.top_k)


def _load_student(folder: Path, dtype: torch.dtype, device: torch.device) -> DeepseekV3ForCausalLM:
    """A model folder as stock transformers loads it, straight onto `device` (no copy in CPU memory first)."""
    return DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device}).eval()


def precision(requested: str, cuda: bool, teacher_dir: Path) -> tuple[bool, torch.dtype]:
    """(train under bf16 autocast, the teacher's dtype) for `--precision`. auto: bf16 on GPUs; on a CPU
    that multiplies bf16 at least as fast as float32 (AMX, AVX512-BF16), autocast with the teacher as
    stored; on other CPUs (AVX2 only, where bf16 matmuls are far slower) float32. Measured on
    SmolLM2-135M (docs/calibrate.md): autocast and a bf16 teacher each moved unseen perplexity by
    under 0.7 points, and trained 1.6x and 2x as fast on an AMX Xeon."""
    if requested != "auto":
        return requested == "bf16", torch.bfloat16 if requested == "bf16" else torch.float32
    if cuda:
        return True, torch.bfloat16
    return run_dtype("cpu", torch.bfloat16) == torch.bfloat16, run_dtype("cpu", CheckpointReader(teacher_dir).dtype())


def distill(teacher_dir: Path, converted: Path, out: Path, fit_rows: Packed, held_out: Packed,
            opts: DistillOptions, fingerprint: dict, run: dict, force: bool,
            log: Callable[[str], None] | None = None) -> DistillResult:
    """Train, then write OUT from the main process; `before`/`after` are None on the other processes.

    `opts.resume` continues from the latest checkpoint if there is one, which the caller has checked
    (`check_resume`); a run that does not resume clears earlier checkpoints. When stderr is not a
    terminal, progress goes to `log` as lines."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, parse_flag_from_env, set_seed
    from transformers.utils import logging

    logging.disable_progress_bar()
    cuda = opts.device.startswith("cuda")
    autocast, teacher_dtype = precision(opts.precision, cuda, teacher_dir)
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if autocast else "no", step_scheduler_with_optimizer=False)
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and acc.distributed_type != DistributedType.FSDP:
        raise MlakitError("the accelerate config asks for FSDP, which accelerate runs on GPUs only (here it would "
                          "train unsharded); launch without it on the CPU")
    set_seed(opts.seed)
    seq_len = fit_rows.ids.shape[1]
    if opts.batch_size % acc.num_processes:
        raise MlakitError(f"--batch-size {opts.batch_size} must be a multiple of the {acc.num_processes} processes")
    steps = max(1, math.ceil(opts.tokens / (opts.batch_size * seq_len)))
    ckpt = Checkpoints(opts.checkpoint_dir, fingerprint)
    last = ckpt.latest() if opts.resume else None
    main = acc.is_main_process
    say = log if main and log and not sys.stderr.isatty() else None
    if main:
        create(ckpt.folder)
        if last is None:
            ckpt.clear()
    acc.wait_for_everyone()
    dtype = torch.bfloat16 if cuda else torch.float32
    teacher = _teacher(teacher_dir, fit_rows, held_out, opts, steps, teacher_dtype, acc, say)
    # measured on CONVERTED as stock transformers loads it, like `after` on OUT; the copy is freed
    # before the trained student is built, so the two never share memory
    before = evaluate(teacher, _load_student(converted, dtype, acc.device), held_out, acc.device,
                      opts.batch_size) if main else None
    student, optimizer, scheduler = acc.prepare(*_trainable_student(converted, opts, steps, cuda))
    start_step = 0
    if last is not None:
        try:
            acc.load_state(str(last))
        except Exception as exc:  # torch and safetensors raise many types for a damaged folder
            raise MlakitError(f"--resume: cannot load {last} ({type(exc).__name__}: {exc})") from exc
        start_step = read_json(last / STATE)["step"]
    if say:
        say(f"distill: held-out KL to the teacher {before.kl:.5f} before training")

    bar = tqdm(total=steps, initial=start_step, desc="distill", unit="step", disable=not main or None)
    t0, loss_avg, done_tokens = time.perf_counter(), 0.0, 0
    every = -(-steps // PROGRESS_LINES)
    try:
        for step in range(start_step, steps):
            rows = step_rows(step, opts.batch_size, len(fit_rows), opts.seed)
            loss = _step(acc, teacher, student, optimizer, scheduler, fit_rows, rows, opts.lm_weight)
            loss_avg = loss if step == start_step else 0.9 * loss_avg + 0.1 * loss
            done_tokens += opts.batch_size * seq_len
            rate = done_tokens / (time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{rate:.0f}")
            if say and ((step + 1) % every == 0 or step + 1 == steps):
                say(f"distill: step {step + 1}/{steps}, loss {loss_avg:.4f}, {rate:.0f} tokens/s")
            if (step + 1) % opts.save_every == 0 and step + 1 < steps:
                ckpt.save(acc, step + 1)
    except KeyboardInterrupt:
        if main and ckpt.latest() is not None:
            resume_hint(f"checkpoint {ckpt.latest()}")
        raise
    bar.close()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result = DistillResult(before, None, steps, done_tokens / max(seconds, 1e-9), loss_avg, seconds, peak,
                           getattr(teacher, "tail_mass", None), "bf16" if autocast else "fp32",
                           str(teacher_dtype).removeprefix("torch."))
    acc.wait_for_everyone()
    state = acc.get_state_dict(student)  # under FSDP gathered whole on the main process only
    trained = formatted_state(state, acc.unwrap_model(student).config, opts.train) if main else None
    del state
    # accelerate holds its own references to what it prepared: without them released, nothing of the
    # student or its optimizer state would be freed before OUT is loaded back
    student, optimizer, scheduler = acc.free_memory(student, optimizer, scheduler)
    gc.collect()  # under autocast the student's forward is a method bound to it: a cycle only the collector frees
    if main:
        with atomic_folder(out, force) as tmp:
            export = Export(converted, tmp)
            export.add(trained)
            del trained
            export.close()
            result.after = evaluate(teacher, _load_student(tmp, dtype, acc.device), held_out, acc.device,
                                    opts.batch_size)
            result.kept = keep_better(converted, tmp, before, result.after)
            export.record({**run, **_as_record(result)})
        if say:
            say(f"distill: held-out KL to the teacher {result.after.kl:.5f} after {steps} steps")
        remove(ckpt.folder)
    acc.wait_for_everyone()
    return result


def _teacher(teacher_dir: Path, fit_rows: Packed, held_out: Packed, opts: DistillOptions, steps: int,
             dtype: torch.dtype, acc, log: Callable[[str], None] | None) -> LiveTeacher | CachedTeacher:
    """The source model, or with --teacher-topk its cached top-k log-probabilities over the rows that
    `steps` steps read and the held-out rows (computed once by the main process, the model spread
    over the GPUs and freed before the student is built)."""
    if not opts.teacher_topk:
        return LiveTeacher(load_teacher(teacher_dir, dtype, acc.device))
    fit_order = used_rows(steps, opts.batch_size, len(fit_rows), opts.seed)
    parts = {"fit": (fit_rows, fit_order), "held_out": (held_out, torch.arange(len(held_out)))}
    folder = opts.checkpoint_dir / CACHE
    if acc.is_main_process:
        build_cache(lambda: load_teacher(teacher_dir, dtype, acc.device, spread=True), parts, opts.teacher_topk,
                    opts.batch_size, folder, cache_fingerprint(teacher_dir, parts, opts.teacher_topk), log)
    acc.wait_for_everyone()
    slots = torch.full((len(fit_rows),), -1, dtype=torch.long)
    slots[fit_order] = torch.arange(len(fit_order))
    return CachedTeacher(folder, {"fit": slots, "held_out": parts["held_out"][1]})


def _trainable_student(converted: Path, opts: DistillOptions, steps: int, cuda: bool):
    """The student in the plain parametrization, its AdamW and its warmup-cosine schedule."""
    student = DeepseekV3ForCausalLM.from_pretrained(converted, dtype=torch.float32)
    to_plain(student)
    for name, p in student.named_parameters():
        p.requires_grad_(opts.train == "all" or ".self_attn." in name)
    if opts.checkpointing == "on" or (opts.checkpointing == "auto" and cuda):
        _checkpoint_activations(student)
    student.config.use_cache = False
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=opts.lr,
                                  betas=(0.9, 0.95), weight_decay=0.0)
    return student, optimizer, get_cosine_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * steps), steps)


def _checkpoint_activations(model) -> None:
    """Keep only each layer's input for the backward pass and recompute the rest: the same gradients in
    less memory (Qwen2.5-Coder-1.5B on a CPU, 2 rows of 256: peak RSS 14.6 -> 10.8 GiB at 0.8x the speed)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' name from 5.x on
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _step(acc, teacher: LiveTeacher | CachedTeacher, student, optimizer, scheduler, fit_rows: Packed,
          rows: torch.Tensor, lm_weight: float) -> float:
    """One optimizer step on this process's share of the global batch `rows`; returns the loss of the
    whole batch. Local, so that no tensor of the step's graph (which holds the student's parameters)
    outlives it."""
    whole = fit_rows[rows]
    mine = slice(acc.process_index, None, acc.num_processes)
    ids, pos = whole[mine].input_ids.to(acc.device), whole[mine].position_ids.to(acc.device)
    lm_count = int((next_token_labels(whole.ids, whole.pos) != IGNORE).sum()) / acc.num_processes
    loss = _loss(teacher, student, rows[mine], ids, pos, lm_weight, lm_count)
    acc.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return acc.reduce(loss.detach(), reduction="mean").item()


def _loss(teacher: LiveTeacher | CachedTeacher, student, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
          lm_weight: float, lm_count: float) -> torch.Tensor:
    """This process's share of the global batch's loss (the mean per-token KL(teacher || student) plus
    lm_weight times the mean next-token cross-entropy), such that the data-parallel average of the
    shares, and of their gradients, is that loss.

    A term's share is the process's sum divided by the whole batch's count over the number of
    processes. Every row has as many positions, so the KL's own mean is that; rows differ in labelled
    positions (the last token of a document has none), so the cross-entropy is summed and divided by
    `lm_count`. A mean per process would weigh each token by its process's count and train unlike one
    process on the same batch."""
    s_logits = logits(student, ids, pos)
    loss = teacher.kl("fit", rows, ids, pos, s_logits).mean()
    if lm_weight:
        labels = next_token_labels(ids, pos)
        loss = loss + lm_weight * F.cross_entropy(s_logits.float().flatten(0, 1), labels.flatten(),
                                                  ignore_index=IGNORE, reduction="sum") / lm_count
    return loss


def _as_record(result: DistillResult) -> dict:
    return {"before": result.before.as_dict(), "after": result.after.as_dict(), "steps": result.steps,
            "tokens_per_second": round(result.tokens_per_second, 1), "final_loss": result.final_loss,
            "seconds": round(result.seconds, 1), "peak_memory_gib": result.peak_memory_gib,
            "teacher_tail_mass": result.teacher_tail_mass, "precision": result.precision,
            "teacher_dtype": result.teacher_dtype, "kept": result.kept}
