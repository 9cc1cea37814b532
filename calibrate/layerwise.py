"""Layer-wise calibration: fit each MLA attention block to the source attention block's output.

For each decoder layer in turn, on the calibration hidden states:
1. closed form: given the attention pattern and the latent, the output is linear in the product of
   each head's value up-projection and its o_proj columns, so that product is a least-squares
   solve; each head's product is split back into kv_b value rows and o_proj columns (exact when
   kv_lora_rank <= v_head_dim, a truncated SVD otherwise);
2. Adam on every attention weight (q_proj, the latent and rope rows of kv_a, kv_b, o_proj)
   against the same target, then a final least-squares o_proj given the rest;
3. the stage with the lowest error on the calibration data is kept, so no layer gets worse.
The source's hidden states feed each layer by default (teacher-forced; measured best, see
docs/calibrate.md); `inputs="student"` feeds the student's own, from its already calibrated
layers. Memory holds one layer of each model.

Each finished layer is saved (`LayerProgress`), so that an interrupted stage resumes after the last
one: the saved layers are replayed (forward passes only) and fitting continues with the random
state it had, which gives the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from mlakit.calibrate.checkpoint import LAYERS
from mlakit.calibrate.data import Packed
from mlakit.calibrate.export import stored_attention
from mlakit.calibrate.layers import Student, Teacher
from mlakit.core.checkpoint import Export, read_json, save_tensors, write_json
from mlakit.core.deepseek import format_attention
from mlakit.core.errors import MlakitError
from mlakit.core.forward import MLAWeights, rms_norm, row_chunks
from mlakit.core.guard import writing
from mlakit.core.metrics import Quality, QualityMeter, next_token_labels

INPUTS = ("student", "teacher")
RIDGE = 1e-6
RUN = "run.json"  # the fingerprint of the run whose layers LayerProgress holds
RNG = "rng_state"  # the layer files' entry for the random state after the layer


@dataclass
class LayerwiseOptions:
    steps: int = 200
    lr: float = 1e-3
    batch_rows: int = 2
    inputs: str = "teacher"
    seed: int = 0
    device: str = "cpu"


@dataclass
class LayerwiseResult:
    before: Quality
    after: Quality
    layers: list[dict]
    seconds: float
    resumed_layers: int = 0


class _Fit:
    """One layer's fitting problem: normed inputs x, target attention output, the student's attention."""

    def __init__(self, student: Student, x: torch.Tensor, pos: torch.Tensor, target: torch.Tensor,
                 norm_eps: float | None):
        self.student, self.x, self.pos, self.target, self.norm_eps = student, x, pos, target, norm_eps
        self.chunks = row_chunks(x.shape[0], x.shape[1], student.dims[0] * max(x.shape[1], student.dims[3]))
        self.energy = sum(target[c].pow(2).sum().item() for c in self.chunks)

    def attention(self, rows, w: MLAWeights) -> torch.Tensor:
        """The student's attention on calibration rows, in its latent format."""
        return self.student.attention(self.x[rows], w, self.pos[rows], self.norm_eps)

    def error(self, w: MLAWeights) -> float:
        """The attention error over all calibration rows: ||a - target|| / ||target||, the relative error
        that convert and validate report too."""
        with torch.no_grad():
            err = sum((self.attention(c, w) - self.target[c]).pow(2).sum().item() for c in self.chunks)
        return math.sqrt(err / max(self.energy, 1e-30))

    def least_squares(self, features: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """argmin_M ||F M - target|| over all rows, F = features(rows), in float64 with a tiny ridge."""
        gram = rhs = None
        for c in self.chunks:
            f = features(c).flatten(0, 1).double()
            t = self.target[c].flatten(0, 1).double()
            gram = f.T @ f if gram is None else gram + f.T @ f
            rhs = f.T @ t if rhs is None else rhs + f.T @ t
        ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-30)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + ridge * eye, rhs).float()

    def solve_output(self, w: MLAWeights) -> MLAWeights:
        """o_proj given everything else: the attention output before o_proj is probed with o = I."""
        probe = MLAWeights(w.q, w.kv_a, w.kv_norm, w.kv_b, torch.eye(w.o.shape[1], device=w.o.device))
        o = self.least_squares(lambda c: self.attention(c, probe)).T
        return MLAWeights(w.q, w.kv_a, w.kv_norm, w.kv_b, o.contiguous())

    def solve_values(self, w: MLAWeights) -> MLAWeights:
        """kv_b's value rows and o_proj jointly, given the attention pattern and the latent."""
        heads, nope, _, v = self.student.dims
        rank, hidden = w.kv_b.shape[1], w.o.shape[0]
        kv_b = w.kv_b.view(heads, nope + v, rank)

        def features(c: slice) -> torch.Tensor:
            """Per head, the attention-weighted latent P_h c: the output of value rows that copy the latent."""
            parts = []
            for start in range(0, rank, v):
                m = min(v, rank - start)
                copy = torch.zeros(heads, v, rank, device=w.kv_b.device)
                diag = torch.arange(m, device=copy.device)
                copy[:, diag, start + diag] = 1.0
                probe = MLAWeights(w.q, w.kv_a, w.kv_norm, torch.cat([kv_b[:, :nope], copy], 1).reshape(-1, rank),
                                   torch.eye(heads * v, device=w.o.device))
                out = self.attention(c, probe)
                parts.append(out.unflatten(-1, (heads, v))[..., :m])
            return torch.cat(parts, -1).flatten(-2)

        with torch.no_grad():
            m = self.least_squares(features).view(heads, rank, hidden)
        u, s, vh = torch.linalg.svd(m.transpose(1, 2), full_matrices=False)  # (heads, hidden, k)
        k = min(v, s.shape[1])
        root = s[:, :k].sqrt()
        values = torch.zeros(heads, v, rank, device=m.device)
        values[:, :k] = root[..., None] * vh[:, :k]
        o = torch.zeros(hidden, heads, v, device=m.device)
        o[:, :, :k] = (u[..., :k] * root[:, None]).permute(1, 0, 2)
        kv_b = torch.cat([kv_b[:, :nope], values], 1).reshape(-1, rank)
        return self.solve_output(MLAWeights(w.q, w.kv_a, w.kv_norm, kv_b, o.reshape(hidden, heads * v)))

    def adam(self, w: MLAWeights, opts: LayerwiseOptions, gen: torch.Generator, tick: Callable[[float], None]) -> MLAWeights:
        """A short Adam run on all attention weights against the target, on random row batches."""
        params = [t.detach().clone().requires_grad_(True) for t in (w.q, w.kv_a, w.kv_b, w.o)]
        opt = torch.optim.Adam(params, lr=opts.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / opts.steps)))
        n = self.x.shape[0]
        scale = self.energy / self.target.numel()
        for _ in range(opts.steps):
            rows = torch.randint(0, n, (min(opts.batch_rows, n),), generator=gen).to(self.x.device)
            q, kv_a, kv_b, o = params
            out = self.attention(rows, MLAWeights(q, kv_a, w.kv_norm, kv_b, o))
            loss = (out - self.target[rows]).pow(2).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tick(loss.item())
        q, kv_a, kv_b, o = (p.detach() for p in params)
        return MLAWeights(q, kv_a, w.kv_norm, kv_b, o)


def fit_layer(student: Student, x: torch.Tensor, pos: torch.Tensor, target: torch.Tensor, w: MLAWeights,
              opts: LayerwiseOptions, gen: torch.Generator, tick: Callable[[float], None],
              norm_eps: float | None = None) -> tuple[MLAWeights, dict]:
    """Fit one attention block (plain, or through kv_a_layernorm with `norm_eps`); returns the best
    weights found, its attention error and that of each stage."""
    fit = _Fit(student, x, pos, target, norm_eps)
    stages = {"converted": w}
    stages["least_squares"] = fit.solve_values(w)
    if opts.steps:
        stages["adam"] = fit.solve_output(fit.adam(stages["least_squares"], opts, gen, tick))
    errors = {name: fit.error(s) for name, s in stages.items()}
    kept = min(errors, key=errors.get)
    return stages[kept], {"attn_rel_error": errors[kept], "attn_rel_error_by_stage": errors, "kept": kept}


class LayerProgress:
    """The finished layers of a layer-wise stage in the checkpoint folder: per layer a safetensors file
    with its tensors as written to OUT, the random state after it and its report, and beside them the
    fingerprint of the run (written with the first layer)."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.path = folder / LAYERS
        self.fingerprint = fingerprint

    def _file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def done(self) -> int:
        """How many layers, from the first, are saved."""
        n = 0
        while self._file(n).is_file():
            n += 1
        return n

    def saved(self) -> tuple[Path, dict, dict] | None:
        """Where, the fingerprint they were saved with and this run's (see check_resume); None if none."""
        info = self.path / RUN
        return (self.path, read_json(info), self.fingerprint) if info.is_file() else None

    def save(self, i: int, tensors: dict[str, torch.Tensor], rng: torch.Tensor, report: dict) -> None:
        """Layer i, written under a temporary name and renamed, so that a file present is complete."""
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / RUN).is_file():
            write_json(self.path / RUN, self.fingerprint)
        save_tensors(self._file(i), {**{k: t.contiguous() for k, t in tensors.items()}, RNG: rng},
                     metadata={"report": json.dumps(report)})

    def load(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
        """Layer i's tensors, the random state after it and its report."""
        try:
            with safe_open(self._file(i), "pt") as fh:
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
                report = json.loads(fh.metadata()["report"])
        except Exception as exc:  # safetensors and json raise many types for a damaged file
            raise MlakitError(f"--resume: cannot load {self._file(i)} ({type(exc).__name__}: {exc})") from exc
        return tensors, tensors.pop(RNG), report

    def clear(self) -> None:
        """Forget the saved layers of an earlier run."""
        shutil.rmtree(self.path, ignore_errors=True)

    def release(self) -> None:
        """Delete the layer files once the stage's output holds them; the fingerprint stays, naming it."""
        for path in self.path.glob("layer-*.safetensors"):
            path.unlink()


def calibrate_layerwise(teacher: Teacher, student: Student, fit_rows: Packed, held_out: Packed, export: Export,
                        opts: LayerwiseOptions, progress: LayerProgress | None = None,
                        log: Callable[[str], None] | None = None) -> LayerwiseResult:
    """Fit every layer in turn, write it to `export`, and score held-out text before and after.

    With `progress`, every finished layer is saved there and the layers it already holds are
    replayed instead of fitted. `log` gets one line per layer when stderr is not a terminal."""
    dev, seq_len = opts.device, fit_rows.ids.shape[1]
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(opts.seed)
    resumed = progress.done() if progress else 0
    hidden = student.config.hidden_size
    width = max(teacher.spec.heads, student.dims[0]) * seq_len + teacher.spec.intermediate
    fit, held = _Rows(fit_rows, dev, width), _Rows(held_out, dev, width)
    with torch.no_grad():
        h_teacher = teacher.embed(fit.ids)
        h_student = h_teacher.clone() if opts.inputs == "student" else None
        e_teacher = teacher.embed(held.ids)
        e_before, e_after = e_teacher.clone(), e_teacher.clone()
    reports = []
    tokens_per_step = min(opts.batch_rows, len(fit_rows)) * seq_len
    bar = tqdm(total=teacher.layers * opts.steps, initial=resumed * opts.steps, desc="layer-wise", unit="step",
               disable=None, leave=False)
    for i in range(teacher.layers):
        t_layer, s_layer = teacher.layer(i), student.layer(i)
        layer_start = time.perf_counter()
        native = s_layer.norm_eps is not None
        if i < resumed:
            tensors, rng, report = progress.load(i)
            if i == resumed - 1:
                gen.set_state(rng)
        else:
            with torch.no_grad():
                target = fit.map(lambda h, pos: teacher.attention(h, t_layer, pos), h_teacher)
                h_in = h_teacher if h_student is None else h_student
                x = rms_norm(h_in, s_layer.input_norm, student.eps)

            def tick(loss: float, i: int = i) -> None:
                bar.update()
                rate = (bar.n - resumed * opts.steps) * tokens_per_step / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(layer=i, loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")

            fitted, report = fit_layer(student, x, fit.pos, target, s_layer.attn, opts, gen, tick, s_layer.norm_eps)
            del x, target
            tensors = {k: t.to(export.dtype).cpu()
                       for k, t in format_attention(i, fitted, s_layer.input_norm, hidden, native).items()}
            if progress:
                progress.save(i, tensors, gen.get_state(), report)
        export.add(tensors)
        stored = stored_attention(tensors.__getitem__, i, student.config.kv_lora_rank, native)
        fitted_layer = replace(s_layer, attn=MLAWeights(*(t.to(dev) for t in vars(stored).values())))
        reports.append({"layer": i, **report})
        if log and bar.disable:
            errors = report["attn_rel_error_by_stage"]
            log(f"layer-wise: layer {i + 1}/{teacher.layers} "
                + ("saved by the interrupted run" if i < resumed else f"in {time.perf_counter() - layer_start:.1f} s")
                + f", attention error {errors['converted']:.4f} -> {errors[report['kept']]:.4f} ({report['kept']})")
        with torch.no_grad():
            h_teacher = fit.map(lambda h, pos: teacher.forward_layer(h, t_layer, pos), h_teacher)
            if h_student is not None:
                h_student = fit.map(lambda h, pos: student.forward_layer(h, fitted_layer, pos), h_student)
            e_teacher = held.map(lambda h, pos: teacher.forward_layer(h, t_layer, pos), e_teacher)
            e_before = held.map(lambda h, pos: student.forward_layer(h, s_layer, pos), e_before)
            e_after = held.map(lambda h, pos: student.forward_layer(h, fitted_layer, pos), e_after)
    bar.close()
    before, after = QualityMeter(), QualityMeter()
    labels = next_token_labels(held_out.input_ids, held_out.position_ids).to(dev)
    with torch.no_grad():
        for c in row_chunks(len(held_out), seq_len, student.config.vocab_size):
            t_logits = teacher.logits(e_teacher[c])
            before.add(t_logits, student.logits(e_before[c]), labels[c])
            after.add(t_logits, student.logits(e_after[c]), labels[c])
    return LayerwiseResult(before.result(), after.result(), reports, time.perf_counter() - start, resumed)


class _Rows:
    """Packed rows on the device, and a map over row chunks small enough for the attention scores."""

    def __init__(self, rows: Packed, device: str, width: int):
        self.ids, self.pos = rows.input_ids.to(device), rows.position_ids.to(device)
        self.chunks = row_chunks(len(rows), rows.ids.shape[1], width)

    def map(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[c], self.pos[c]) for c in self.chunks])
