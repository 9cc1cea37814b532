"""Layer-wise calibration: fit each MLA attention block to the source attention block's output.

For each decoder layer in turn, on the calibration hidden states:
1. closed form: given the attention pattern and the latent, the output is linear in the product of
   each head's value up-projection and its o_proj columns, so that product is a least-squares
   solve, shrunk towards the converted weights' product with each ridge of RIDGES (one stage
   each); each head's product is split back into kv_b value rows and o_proj columns (exact when
   kv_lora_rank <= v_head_dim, a truncated SVD otherwise);
2. Adam on every attention weight (q_proj, the latent and rope rows of kv_a, kv_b, o_proj)
   against the same target, from the least-squares stage that did best on the held-out rows,
   then a final least-squares o_proj given the rest with that stage's ridge;
3. the stage with the lowest error on the held-out rows is kept (a stage fitted on the calibration
   rows always looks better on them), so no layer gets worse on text it was not fitted to.
The source's hidden states feed each layer by default (teacher-forced; measured best, see
docs/calibrate.md); `inputs="student"` feeds the student's own, from its already calibrated
layers. Memory holds one source layer and the student's attention (its norms and MLP are the source's
tensors where convert copied them).

The least squares of step 1 has heads x kv_lora_rank unknowns per output dim. Up to JOINT_COLUMNS
it is one float64 solve; beyond, `_Fit.blockwise` iterates over groups of heads, so that memory
grows with the head count, not its square: for 64 heads at rank 512 (a 70B shape, hidden 8192) the
joint solve held four 8 GiB matrices (32 GiB), the groups' factors take 1 GiB and the iterates
4 GiB. JOINT_COLUMNS is 4096 (256 MiB for the joint matrix and its factor) because the iteration is
slow on attention features, whose heads attend alike: the joint solve is kept while it is small,
and the groups are as large as it.

Each finished layer is saved (`LayerProgress`), so that an interrupted stage resumes after the last
one: the saved layers are replayed (forward passes only) and fitting continues with the random
state it had, which gives the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
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
from mlakit.calibrate.layers import Student
from mlakit.core.checkpoint import Export, read_json, save_tensors, write_json
from mlakit.core.latent import format_attention
from mlakit.core.errors import MlakitError
from mlakit.core.forward import MLAWeights, rms_norm, row_chunks
from mlakit.core.guard import writing
from mlakit.core.metrics import Quality, QualityMeter, next_token_labels
from mlakit.core.stream import SOURCE, LayerStream, Rows, SourceModel

INPUTS = ("student", "teacher")
FIT, HELD = "fit", "held"  # the layer stream's row sets
AFTER, BEFORE = "student", "converted"  # the student's streams: as fitted, as converted
RIDGE = 1e-6
# The least-squares stages' ridges, in units of the mean diagonal of F^T F, each shrinking the solution
# towards the weights it starts from: fitted on a few thousand tokens, the nearly unregularized solve
# (RIDGE) lowered SmolLM2-135M's per-layer error on the fitting rows and raised it up to threefold on
# held-out rows at a quarter of the cache.
RIDGES = (RIDGE, 1e-2, 1e-1, 1.0)
JOINT_COLUMNS = 4096  # least-squares unknowns per output dim solved at once (the module docstring says why)
ITERATIONS = 50  # the blockwise solve stops after this many iterations,
TOLERANCE = 1e-5  # or at one that improves its objective by less than this fraction
SOLVE_COLUMNS = 1024  # output dims per preconditioner solve
DOT_ELEMENTS = 2**22  # elements per block of the iterates' inner products
RUN = "run.json"  # the fingerprint of the run whose layers LayerProgress holds
RNG = "rng_state"  # the layer files' entry for the random state after the layer
Features = Callable[[slice, slice], torch.Tensor]  # (rows, heads) -> (rows, seq, heads x columns per head)


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
    """One layer's fitting problem: normed inputs x, target attention output, the student's attention.

    `joint_columns` bounds the least-squares systems solved at once (see `least_squares`)."""

    def __init__(self, student: Student, x: torch.Tensor, pos: torch.Tensor, target: torch.Tensor,
                 norm_eps: float | None, joint_columns: int = JOINT_COLUMNS):
        self.student, self.x, self.pos, self.target, self.norm_eps = student, x, pos, target, norm_eps
        self.joint_columns = joint_columns
        self.chunks = row_chunks(x.shape[0], x.shape[1], student.dims[0] * max(x.shape[1], student.dims[3]))
        self.energy = sum(target[c].pow(2).sum().item() for c in self.chunks)

    def attention(self, rows, w: MLAWeights, heads: int | None = None) -> torch.Tensor:
        """The student's attention on calibration rows, in its latent format; `heads` when w holds only
        that many heads (their q and kv_b rows)."""
        student = self.student
        if heads is not None and heads != student.dims[0]:
            student = copy.copy(student)  # Student.attention reads its head count from dims
            student.dims = (heads, *student.dims[1:])
        return student.attention(self.x[rows], w, self.pos[rows], self.norm_eps)

    def head_outputs(self, rows, w: MLAWeights, heads: slice, values: torch.Tensor | None = None) -> torch.Tensor:
        """Heads `heads` of w before o_proj (o_proj probed with the identity), whose output o_proj maps
        linearly; `values` (per head v_head x rank) replace those heads' value rows of kv_b."""
        n_heads, nope, _, v = self.student.dims
        n = heads.stop - heads.start
        kv_b = w.kv_b.view(n_heads, nope + v, -1)[heads]
        if values is not None:
            kv_b = torch.cat([kv_b[:, :nope], values], 1)
        probe = MLAWeights(w.q.view(n_heads, -1, w.q.shape[1])[heads].flatten(0, 1), w.kv_a, w.kv_norm,
                           kv_b.flatten(0, 1), torch.eye(n * v, device=w.o.device))
        return self.attention(rows, probe, n)

    def error(self, w: MLAWeights) -> float:
        """The attention error over all calibration rows: ||a - target|| / ||target||, the relative error
        that convert and validate report too."""
        with torch.no_grad():
            err = sum((self.attention(c, w) - self.target[c]).pow(2).sum().item() for c in self.chunks)
        return math.sqrt(err / max(self.energy, 1e-30))

    def normal_equations(self, features: Features, heads: slice,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F^T F and F^T target over all rows for the features of `heads`, in float64."""
        gram = rhs = None
        for c in self.chunks:
            f = features(c, heads).flatten(0, 1).double()
            t = target[c].flatten(0, 1).double()
            if gram is None:
                gram, rhs = f.T @ f, f.T @ t
            else:
                gram.addmm_(f.T, f)
                rhs.addmm_(f.T, t)
        return gram, rhs

    def least_squares(self, features: Features, heads: int, width: int, ridges: tuple[float, ...] = (RIDGE,),
                      target: torch.Tensor | None = None) -> list[torch.Tensor]:
        """For each ridge r, argmin_M ||F M - target||^2 + r d ||M||^2 over all rows, F = features(rows,
        heads) with `width` columns per head and d the mean diagonal of F^T F; float64 solves. The
        target is the calibration target unless given (a residual, to shrink towards a prior).

        Up to `joint_columns` columns it is one solve per ridge of one Gram; beyond, `blockwise`, whose
        memory does not grow with the square of the head count."""
        group = max(1, self.joint_columns // width)
        if heads > group:
            return [self.blockwise(features, heads, width, ridge=r, target=target)[0] for r in ridges]
        gram, rhs = self.normal_equations(features, slice(0, heads), self.target if target is None else target)
        scale = gram.diagonal().mean().clamp_min(1e-30)
        out = []
        for r in ridges:
            system = gram.clone()
            system.diagonal().add_(r * scale)
            out.append(torch.linalg.solve(system, rhs).float())
            del system
        return out

    def residual(self, w: MLAWeights) -> torch.Tensor:
        """The target less w's attention output, on every row: what a correction to w has to fit."""
        with torch.no_grad():
            return torch.cat([self.target[c] - self.attention(c, w) for c in self.chunks])

    def blockwise(self, features: Features, heads: int, width: int, iterations: int = ITERATIONS,
                  ridge: float = RIDGE, target: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
        """`least_squares` without the whole Gram: conjugate gradients from M = 0, preconditioned with
        the exact inverse of each group's diagonal block (groups of at most `joint_columns // width`
        heads, at least one). Each iteration is one pass over the rows and steps to the minimum along
        its direction, so the objective never increases; it stops when an iteration improves the
        objective by less than TOLERANCE of its value, or after `iterations`. Returns M and the
        objective ||F M - target||^2 + ridge d ||M||^2 before and after each iteration.

        Memory: the groups' Cholesky factors (columns x joint_columns float64 values in all), four
        float32 matrices of M's size and one row chunk's features."""
        group = max(1, self.joint_columns // width)
        groups = [slice(h, min(h + group, heads)) for h in range(0, heads, group)]
        cols = [slice(g.start * width, g.stop * width) for g in groups]
        target = self.target if target is None else target
        with torch.no_grad():
            r = target.new_empty(heads * width, target.shape[-1])
            blocks = []
            for g, k in zip(groups, cols):
                block, rhs = self.normal_equations(features, g, target)
                blocks.append(block)
                r[k] = rhs
            del rhs
            # the whole system's ridge: `ridge` times its mean diagonal
            ridge = ridge * max(sum(b.diagonal().sum().item() for b in blocks) / (heads * width), 1e-30)
            for i, block in enumerate(blocks):
                block.diagonal().add_(ridge)
                blocks[i] = torch.linalg.cholesky(block)

            def precondition(v: torch.Tensor) -> torch.Tensor:
                z = torch.empty_like(v)
                for f, k in zip(blocks, cols):
                    # SOLVE_COLUMNS output dims at a time: float64 copies of a block's rows are 256 MiB at 70B shapes
                    for j in range(0, v.shape[1], SOLVE_COLUMNS):
                        z[k, j:j + SOLVE_COLUMNS] = torch.cholesky_solve(v[k, j:j + SOLVE_COLUMNS].double(), f)
                return z

            def dot(a: torch.Tensor, b: torch.Tensor) -> float:
                # in row blocks: over whole iterates, a * b and its float64 copy were three times their size
                step = max(1, DOT_ELEMENTS // a[0].numel())
                return sum((a[i:i + step] * b[i:i + step]).sum(dtype=torch.float64).item()
                           for i in range(0, a.shape[0], step))

            m = torch.zeros_like(r)
            p = precondition(r)
            rz = dot(r, p)
            objective = [self.energy if target is self.target else sum(target[c].pow(2).sum().item()
                                                                       for c in self.chunks)]
            for _ in range(iterations):
                q = self.gram_times(features, groups, cols, p).add_(p, alpha=ridge)
                pr, pq = dot(p, r), dot(p, q)
                if pr <= 0:  # nothing left to fit (a zero target, or exact convergence)
                    break
                m.add_(p, alpha=pr / pq)
                r.sub_(q, alpha=pr / pq)
                del q
                objective.append(objective[-1] - pr * pr / pq)
                if objective[-2] - objective[-1] < TOLERANCE * objective[-2]:
                    break
                z = precondition(r)
                rz, previous = dot(r, z), rz
                p = z.add_(p, alpha=rz / previous)
        return m, objective

    def gram_times(self, features: Features, groups: list[slice], cols: list[slice], p: torch.Tensor) -> torch.Tensor:
        """F^T F p over all rows, from one chunk's features at a time."""
        q = torch.zeros_like(p)
        for c in self.chunks:
            fs = [features(c, g).flatten(0, 1) for g in groups]
            u = sum(f @ p[k] for f, k in zip(fs, cols))
            for f, k in zip(fs, cols):
                q[k] += f.T @ u
        return q

    def solve_output(self, w: MLAWeights, ridge: float = RIDGE) -> MLAWeights:
        """o_proj given everything else, from the heads' outputs before o_proj, shrunk towards w's."""
        heads, v = self.student.dims[0], self.student.dims[3]
        step = self.least_squares(lambda c, hs: self.head_outputs(c, w, hs), heads, v, (ridge,), self.residual(w))[0]
        return MLAWeights(w.q, w.kv_a, w.kv_norm, w.kv_b, (w.o + step.T).contiguous())

    def value_features(self, w: MLAWeights) -> Features:
        """Per head, the attention-weighted latent P_h c: the output of value rows that copy the latent,
        in blocks of v_head latent dims."""
        v = self.student.dims[3]
        rank = w.kv_b.shape[1]

        def features(c: slice, heads: slice) -> torch.Tensor:
            n = heads.stop - heads.start
            parts = []
            for start in range(0, rank, v):
                m = min(v, rank - start)
                copies = torch.zeros(n, v, rank, device=w.kv_b.device)
                diag = torch.arange(m, device=copies.device)
                copies[:, diag, start + diag] = 1.0
                parts.append(self.head_outputs(c, w, heads, copies).unflatten(-1, (n, v))[..., :m])
            return torch.cat(parts, -1).flatten(-2)

        return features

    def solve_values(self, w: MLAWeights, ridges: tuple[float, ...] = (RIDGE,)) -> list[MLAWeights]:
        """kv_b's value rows and o_proj jointly, given the attention pattern and the latent, for each
        ridge: their per-head product is w's plus a least-squares step on the residual."""
        heads, nope, _, v = self.student.dims
        rank, hidden = w.kv_b.shape[1], w.o.shape[0]
        kv_b = w.kv_b.view(heads, nope + v, rank)
        prior = torch.einsum("hvr,dhv->hrd", kv_b[:, nope:], w.o.view(hidden, heads, v))
        with torch.no_grad():
            steps = self.least_squares(self.value_features(w), heads, rank, ridges, self.residual(w))
        out = []
        for ridge, step in zip(ridges, steps):
            m = prior + step.view(heads, rank, hidden)
            u, s, vh = torch.linalg.svd(m.transpose(1, 2), full_matrices=False)  # (heads, hidden, k)
            k = min(v, s.shape[1])
            root = s[:, :k].sqrt()
            values = torch.zeros(heads, v, rank, device=m.device)
            values[:, :k] = root[..., None] * vh[:, :k]
            o = torch.zeros(hidden, heads, v, device=m.device)
            o[:, :, :k] = (u[..., :k] * root[:, None]).permute(1, 0, 2)
            split = torch.cat([kv_b[:, :nope], values], 1).reshape(-1, rank)
            out.append(self.solve_output(MLAWeights(w.q, w.kv_a, w.kv_norm, split, o.reshape(hidden, heads * v)),
                                         ridge))
        return out

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
              norm_eps: float | None = None,
              held_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[MLAWeights, dict]:
    """Fit one attention block (plain, or through kv_a_layernorm with `norm_eps`) on (x, pos, target);
    keep the stage with the least error on `held_out` (x, pos, target) rows, or on the fitting rows
    when none are given. Returns its weights and the attention errors of every stage on both."""
    fit = _Fit(student, x, pos, target, norm_eps)
    judge_fit = _Fit(student, *held_out, norm_eps) if held_out else fit
    # in-sample, the smallest ridge always looks best: without held-out rows only it is fitted
    ridges = RIDGES if held_out else RIDGES[:1]
    stages = {"converted": w}
    stages.update({f"least_squares {r:g}": fitted for r, fitted in zip(ridges, fit.solve_values(w, ridges))})
    held = {name: judge_fit.error(s) for name, s in stages.items()} if held_out else None
    if opts.steps:
        start = min((n for n in stages if n != "converted"), key=lambda n: (held or {}).get(n, 0.0))
        stages["adam"] = fit.solve_output(fit.adam(stages[start], opts, gen, tick), float(start.split()[-1]))
        if held is not None:
            held["adam"] = judge_fit.error(stages["adam"])
    errors = {name: fit.error(s) for name, s in stages.items()}
    judge = held or errors
    kept = min(judge, key=judge.get)
    return stages[kept], {"attn_rel_error": errors[kept], "attn_rel_error_by_stage": errors,
                          "attn_rel_error_held_out": held and held[kept], "attn_rel_error_held_out_by_stage": held,
                          "kept": kept}


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


def calibrate_layerwise(teacher: SourceModel, student: Student, fit_rows: Packed, held_out: Packed, export: Export,
                        opts: LayerwiseOptions, progress: LayerProgress | None = None,
                        log: Callable[[str], None] | None = None) -> LayerwiseResult:
    """Fit every layer in turn, write it to `export`, and score held-out text before and after.

    The layer stream (`core/stream.py`) carries the teacher's hidden states on both row sets and,
    beside them, the student's: as fitted (`AFTER`, on the held-out rows, and on the fitting rows too
    with `inputs="student"`) and as converted (`BEFORE`, held-out rows). With `progress`, every
    finished layer is saved there and the layers it already holds are replayed instead of fitted.
    `log` gets one line per layer when stderr is not a terminal."""
    dev, seq_len = opts.device, fit_rows.ids.shape[1]
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(opts.seed)
    resumed = progress.done() if progress else 0
    hidden = student.config.hidden_size
    own = opts.inputs == "student"
    stream = LayerStream(teacher, {FIT: Rows(fit_rows.input_ids, fit_rows.position_ids),
                                   HELD: Rows(held_out.input_ids, held_out.position_ids)},
                         max(teacher.spec.heads, student.dims[0]) * seq_len + teacher.spec.intermediate,
                         carry={AFTER: [FIT, HELD] if own else [HELD], BEFORE: [HELD]})
    inputs = AFTER if own else SOURCE  # the stream each layer is fitted and judged on
    reports = []
    tokens_per_step = min(opts.batch_rows, len(fit_rows)) * seq_len
    bar = tqdm(total=teacher.layers * opts.steps, initial=resumed * opts.steps, desc="layer-wise", unit="step",
               disable=None, leave=False)
    for step in stream:
        i = step.index
        s_layer = student.layer(i, step.source)  # the norms and MLP that convert copied are the source's tensors
        layer_start = time.perf_counter()
        native = s_layer.norm_eps is not None
        if i < resumed:
            tensors, rng, report = progress.load(i)
            if i == resumed - 1:
                gen.set_state(rng)
        else:
            with torch.no_grad():
                x = rms_norm(step.inputs(FIT, inputs), s_layer.input_norm, student.eps)
                judge = (rms_norm(step.inputs(HELD, inputs), s_layer.input_norm, student.eps),
                         stream.positions(HELD), step.target(HELD))

            def tick(loss: float, i: int = i) -> None:
                bar.update()
                rate = (bar.n - resumed * opts.steps) * tokens_per_step / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(layer=i, loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")

            fitted, report = fit_layer(student, x, stream.positions(FIT), step.target(FIT), s_layer.attn, opts, gen,
                                       tick, s_layer.norm_eps, judge)
            del x, judge
            tensors = {k: t.to(export.dtype).cpu()
                       for k, t in format_attention(i, fitted, s_layer.input_norm, hidden, native).items()}
            del fitted
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
                + f", attention error {errors['converted']:.4f} -> {errors[report['kept']]:.4f} ({report['kept']}"
                + (f"; held out {report['attn_rel_error_held_out_by_stage']['converted']:.4f} -> "
                   f"{report['attn_rel_error_held_out']:.4f})" if report.get("attn_rel_error_held_out") else ")"))
        with torch.no_grad():
            step.advance(**{AFTER: lambda h, pos, layer=fitted_layer: student.forward_layer(h, layer, pos),
                            BEFORE: lambda h, pos, layer=s_layer: student.forward_layer(h, layer, pos)})
        # freed now, not after the next layer is read: s_layer holds this source layer's MLP
        del s_layer, fitted_layer, stored, tensors
    del step  # the last source layer, before the output heads are read
    bar.close()
    student.share_head(teacher)  # convert copies the final norm and lm_head: one float32 copy for both
    before, after = QualityMeter(), QualityMeter()
    labels = next_token_labels(held_out.input_ids, held_out.position_ids).to(dev)
    with torch.no_grad():
        # chunks sized for logits, not for the hidden states: a chunk's logits and the softmax temporaries of
        # its KL are several times vocabulary x tokens floats
        for c in row_chunks(len(held_out), seq_len, student.config.vocab_size):
            t_logits = teacher.logits(stream.hidden(HELD)[c])
            before.add(t_logits, student.logits(stream.hidden(HELD, BEFORE)[c]), labels[c])
            after.add(t_logits, student.logits(stream.hidden(HELD, AFTER)[c]), labels[c])
    return LayerwiseResult(before.result(), after.result(), reports, time.perf_counter() - start, resumed)
