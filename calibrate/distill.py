"""Distillation: train the converted model end to end on KL(teacher || student) next-token distributions.

Runs through accelerate, so `accelerate launch -m mlakit calibrate ...` trains data-parallel with
DDP or FSDP unchanged; on GPUs it uses bf16 autocast and gradient checkpointing. The student is
trained in the plain parametrization (no latent norm, see export.py) and written back in the format.
The data order is a pure function of the seed and the step, so a checkpoint (model, optimizer,
scheduler, RNG states, step) restores the exact run: N steps, a resume, N more steps give the
weights of 2N steps in one run.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM, get_cosine_schedule_with_warmup

from mlakit.calibrate.data import Packed
from mlakit.calibrate.export import Export, keep_better
from mlakit.calibrate.metrics import IGNORE, Quality, QualityMeter, next_token_labels
from mlakit.calibrate.teacher import CACHE, CACHE_INFO, CachedTeacher, LiveTeacher, build_cache, cache_fingerprint, \
    cache_ready, logits
from mlakit.convert.checkpoint import read_json, write_json
from mlakit.convert.deepseek import attention_names, format_attention, latent_is_linear, plain_latent
from mlakit.convert.errors import MlakitError
from mlakit.convert.forward import MLAWeights
from mlakit.convert.guard import atomic_folder

TRAIN = ("attention", "all")
STATE = "mlakit_state.json"
CREATED = ".mlakit-created"  # marks a checkpoint folder mlakit made, which it may then remove
WARMUP_FRACTION = 0.05


@dataclass
class DistillOptions:
    tokens: int = 131072
    lr: float = 1e-4
    batch_size: int = 8
    train: str = "attention"
    lm_weight: float = 0.0
    save_every: int = 200
    checkpoint_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    teacher_topk: int = 0


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


def step_rows(step: int, batch: int, n_rows: int, seed: int) -> torch.Tensor:
    """Rows of global step `step`: consecutive slices of one seeded permutation per epoch."""
    first = step * batch
    index = torch.arange(first, first + batch)
    epochs = index // n_rows
    rows = torch.empty(batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        mask = epochs == epoch
        rows[mask] = perm[index[mask] % n_rows]
    return rows


class Checkpoints:
    """`step-NNNNNNN` folders of accelerate state plus our step and run fingerprint, written last."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = folder
        self.fingerprint = fingerprint

    def latest(self) -> Path | None:
        done = sorted(p for p in self.folder.glob("step-*") if (p / STATE).is_file()) if self.folder.is_dir() else []
        return done[-1] if done else None

    def check(self, resume: bool, force: bool) -> Path | None:
        """The checkpoint to resume from, if any; refuse to mix runs. Reads only, so it can run early."""
        last = self.latest()
        if resume:
            if last is None:
                raise MlakitError(f"--resume: no complete checkpoint in {self.folder}; start without --resume")
            saved = read_json(last / STATE).get("fingerprint", {})
            for key, value in self.fingerprint.items():
                if saved.get(key) != value:
                    raise MlakitError(
                        f"--resume: {last} was saved by a run with {key} {saved.get(key)!r}, not {value!r}; "
                        "resume with the same options, or pass --force without --resume to start over"
                    )
            return last
        if last is not None and not force:
            raise MlakitError(
                f"{self.folder} holds checkpoints of an unfinished run: pass --resume to continue it, "
                "or --force to start over"
            )
        return None

    def create(self) -> None:
        """Make the folder if it is missing, marked as mlakit's."""
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            (self.folder / CREATED).touch()

    def remove(self) -> None:
        """After a finished run: delete what mlakit wrote (checkpoints, teacher cache), and the folder
        only if mlakit made it and nothing else is left in it; a folder the user named may hold more."""
        self.clear()
        for name in (CACHE, CACHE_INFO):
            (self.folder / name).unlink(missing_ok=True)
        if (self.folder / CREATED).is_file():
            (self.folder / CREATED).unlink()
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def clear(self) -> None:
        """Remove the checkpoints of an earlier run; a teacher cache stays, it checks its own fingerprint."""
        for old in [*self.folder.glob("step-*"), *self.folder.glob(".step-*.tmp")]:
            shutil.rmtree(old)

    def save(self, accelerator, step: int) -> None:
        tmp = self.folder / f".step-{step:07d}.tmp"
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
    labels = next_token_labels(rows.input_ids, rows.position_ids)
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            index = torch.arange(start, min(start + batch, len(rows)))
            ids, pos = rows.input_ids[index].to(device), rows.position_ids[index].to(device)
            teacher.measure(meter, "held_out", index, ids, pos, logits(student, ids, pos), labels[index].to(device))
    return meter.result(teacher.top_k)


def _load_student(folder: Path, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def distill(teacher_dir: Path, converted: Path, out: Path, fit_rows: Packed, held_out: Packed,
            opts: DistillOptions, fingerprint: dict, run: dict, force: bool) -> DistillResult:
    """Train, then write OUT from the main process; `before`/`after` are None on the other processes."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging

    logging.disable_progress_bar()
    cuda = opts.device.startswith("cuda")
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no", step_scheduler_with_optimizer=False)
    set_seed(opts.seed)
    seq_len = fit_rows.input_ids.shape[1]
    if opts.batch_size % acc.num_processes:
        raise MlakitError(f"--batch-size {opts.batch_size} must be a multiple of the {acc.num_processes} processes")
    steps = max(1, math.ceil(opts.tokens / (opts.batch_size * seq_len)))
    ckpt = Checkpoints(opts.checkpoint_dir, fingerprint)
    last = ckpt.check(opts.resume, force)
    if acc.is_main_process:
        ckpt.create()
        if last is None:
            ckpt.clear()
    acc.wait_for_everyone()
    dtype = torch.bfloat16 if cuda else torch.float32
    teacher = _teacher(teacher_dir, fit_rows, held_out, opts, ckpt.folder, dtype, acc)
    student, optimizer, scheduler = acc.prepare(*_trainable_student(converted, opts, steps, cuda))
    start_step = 0
    if last is not None:
        try:
            acc.load_state(str(last))
        except Exception as exc:  # torch and safetensors raise many types for a damaged folder
            raise MlakitError(f"--resume: cannot load {last} ({type(exc).__name__}: {exc})") from exc
        start_step = read_json(last / STATE)["step"]
    main = acc.is_main_process
    before = evaluate(teacher, _load_student(converted, dtype).to(acc.device), held_out, acc.device,
                      opts.batch_size) if main else None

    bar = tqdm(total=steps, initial=start_step, desc="distill", unit="step", disable=not main or None)
    t0, loss_avg, done_tokens = time.perf_counter(), 0.0, 0
    try:
        for step in range(start_step, steps):
            rows = step_rows(step, opts.batch_size, len(fit_rows), opts.seed)[acc.process_index :: acc.num_processes]
            ids, pos = fit_rows.input_ids[rows].to(acc.device), fit_rows.position_ids[rows].to(acc.device)
            loss = _loss(teacher, student, rows, ids, pos, opts.lm_weight)
            acc.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_avg = loss.item() if step == start_step else 0.9 * loss_avg + 0.1 * loss.item()
            done_tokens += opts.batch_size * seq_len
            bar.update()
            bar.set_postfix(loss=f"{loss_avg:.4f}", tok_s=f"{done_tokens / (time.perf_counter() - t0):.0f}")
            if (step + 1) % opts.save_every == 0 and step + 1 < steps:
                ckpt.save(acc, step + 1)
    except KeyboardInterrupt:
        if main and ckpt.latest() is not None:
            print(f"checkpoint {ckpt.latest()} kept: rerun with --resume to continue", file=sys.stderr)
        raise
    bar.close()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result = DistillResult(before, None, steps, done_tokens / max(seconds, 1e-9), loss_avg, seconds, peak,
                           getattr(teacher, "tail_mass", None))
    acc.wait_for_everyone()
    state = acc.get_state_dict(student)
    if main:
        config = acc.unwrap_model(student).config
        del student, optimizer
        with atomic_folder(out, force) as tmp:
            export = Export(converted, tmp)
            export.add(formatted_state(state, config, opts.train))
            del state
            export.close()
            result.after = evaluate(teacher, _load_student(tmp, dtype).to(acc.device), held_out, acc.device,
                                    opts.batch_size)
            result.kept = keep_better(converted, tmp, before, result.after)
            export.record({**run, **_as_record(result)})
        ckpt.remove()
    acc.wait_for_everyone()
    return result


def _teacher(teacher_dir: Path, fit_rows: Packed, held_out: Packed, opts: DistillOptions, folder: Path,
             dtype: torch.dtype, acc) -> LiveTeacher | CachedTeacher:
    """The source model, or with --teacher-topk its cached top-k log-probabilities (computed once by the
    main process, then the model is freed before the student is built)."""

    def load():
        model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(acc.device).eval()
        return model.requires_grad_(False)

    if not opts.teacher_topk:
        return LiveTeacher(load())
    parts = {"fit": fit_rows, "held_out": held_out}
    fingerprint = cache_fingerprint(teacher_dir, parts, opts.teacher_topk)
    cache = folder / CACHE
    if acc.is_main_process and not cache_ready(cache, fingerprint):
        model = load()
        build_cache(model, parts, opts.teacher_topk, opts.batch_size, acc.device, cache, fingerprint)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    acc.wait_for_everyone()
    return CachedTeacher(cache)


def _trainable_student(converted: Path, opts: DistillOptions, steps: int, cuda: bool):
    """The student in the plain parametrization, its AdamW and its warmup-cosine schedule."""
    student = DeepseekV3ForCausalLM.from_pretrained(converted, dtype=torch.float32)
    to_plain(student)
    for name, p in student.named_parameters():
        p.requires_grad_(opts.train == "all" or ".self_attn." in name)
    if cuda:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=opts.lr,
                                  betas=(0.9, 0.95), weight_decay=0.0)
    return student, optimizer, get_cosine_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * steps), steps)


def _loss(teacher: LiveTeacher | CachedTeacher, student, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
          lm_weight: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student), plus lm_weight times the next-token cross-entropy."""
    s_logits = logits(student, ids, pos)
    loss = teacher.kl("fit", rows, ids, pos, s_logits).mean()
    if lm_weight:
        labels = next_token_labels(ids, pos)
        loss = loss + lm_weight * F.cross_entropy(s_logits.float().flatten(0, 1), labels.flatten(),
                                                  ignore_index=IGNORE)
    return loss


def _as_record(result: DistillResult) -> dict:
    return {"before": result.before.as_dict(), "after": result.after.as_dict(), "steps": result.steps,
            "tokens_per_second": round(result.tokens_per_second, 1), "final_loss": result.final_loss,
            "seconds": round(result.seconds, 1), "peak_memory_gib": result.peak_memory_gib,
            "teacher_tail_mass": result.teacher_tail_mass, "kept": result.kept}
