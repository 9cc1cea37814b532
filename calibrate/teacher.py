"""The distillation teacher: the source model run alongside the student, or its top-k next-token
log-probabilities computed once and read back from disk.

The second form is for models where teacher and student do not fit in memory together: one pass of
the teacher over the rows training will read and the held-out rows writes the cache, the teacher is
freed, and training reads only the rows of each step. The KL is then that of both distributions
coarsened to the teacher's top k tokens plus one bucket for the rest (`top_k_kl`, as `mlakit
validate` measures it): exact when the k tokens hold all of the teacher's probability, a lower bound
otherwise; the mass left out is reported. Held-out perplexities stay exact: the teacher's
log-probability of every label is stored.

The cache is a folder of safetensors chunks of about CHUNK_BYTES each, written as the pass goes, so
memory holds one chunk whatever the number of tokens; `info.json` names the run it belongs to, and
an interrupted pass keeps its finished chunks for the next run with the same rows.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from mlakit.calibrate.data import Packed
from mlakit.core.checkpoint import read_json, save_tensors, write_json
from mlakit.core.guard import writing
from mlakit.core.metrics import IGNORE, QualityMeter, next_token_labels, rest_log_prob, token_kl, top_k_kl

INFO = "info.json"
CHUNK_BYTES = 64 * 2**20
KEYS = ("logp", "index", "rest", "label_logp")


def logits(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits of packed rows: transformers turns restarting position ids into a block-diagonal causal
    mask only when no cache is in use."""
    return model(ids, position_ids=pos, use_cache=False).logits


def load_teacher(folder: Path, dtype: torch.dtype, device: torch.device, spread: bool = False):
    """The source model in inference mode, loaded straight onto `device` (no whole copy in CPU memory
    first, which every data-parallel process would make at once); with `spread` on CUDA, placed by
    accelerate (`device_map="auto"`) over every visible GPU, then CPU memory, so that a teacher larger
    than one GPU still runs. A live teacher is not spread: each data-parallel process holds its own."""
    device_map = "auto" if spread and device.type == "cuda" else {"": device}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map).eval().requires_grad_(False)


class LiveTeacher:
    """The teacher model itself, run on every batch."""

    top_k = 0

    def __init__(self, model) -> None:
        self.model = model

    def kl(self, part: str, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
           student_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = logits(self.model, ids, pos)
        return token_kl(teacher_logits, student_logits)

    def measure(self, meter: QualityMeter, part: str, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                student_logits: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.no_grad():
            meter.add(logits(self.model, ids, pos), student_logits, labels)


class CachedTeacher:
    """The teacher's top-k log-probabilities, read a row at a time from the cache's chunks.

    `slots[part][row]` is where a row of that part (a row index of the fit or held-out rows) sits in
    the cache."""

    def __init__(self, folder: Path, slots: dict[str, torch.Tensor]) -> None:
        info = read_json(folder / INFO)
        self.top_k, self.tail_mass, self.chunk_rows = info["top_k"], info["tail_mass"], info["chunk_rows"]
        self.folder, self.slots = folder, slots

    @functools.lru_cache(maxsize=8)
    def _open(self, name: str):
        return safe_open(self.folder / name, "pt")

    def _rows(self, part: str, key: str, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = []
        for slot in self.slots[part][rows.cpu()].tolist():
            chunk, offset = divmod(slot, self.chunk_rows)
            out.append(self._open(chunk_name(part, chunk)).get_slice(key)[offset : offset + 1])
        return torch.cat(out).to(device)

    def kl(self, part: str, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
           student_logits: torch.Tensor) -> torch.Tensor:
        top_lp, ids, rest_lp = (self._rows(part, key, rows, student_logits.device) for key in KEYS[:3])
        return top_k_kl(top_lp, ids, rest_lp, torch.log_softmax(student_logits.float(), dim=-1))

    def measure(self, meter: QualityMeter, part: str, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                student_logits: torch.Tensor, labels: torch.Tensor) -> None:
        dev = student_logits.device
        meter.add_cached(self._rows(part, "label_logp", rows, dev), self.kl(part, rows, ids, pos, student_logits),
                         student_logits, labels)


def chunk_name(part: str, chunk: int) -> str:
    return f"{part}-{chunk:05d}.safetensors"


def chunk_rows(seq_len: int, top_k: int) -> int:
    """Rows per chunk: about CHUNK_BYTES at 8·k + 8 bytes per token."""
    return max(1, CHUNK_BYTES // (seq_len * (8 * top_k + 8)))


def cache_fingerprint(teacher_dir: Path, parts: dict[str, tuple[Packed, torch.Tensor]], top_k: int) -> dict:
    """What the cache depends on: the teacher, the exact rows in cache order, and k."""
    digest = hashlib.sha256()
    for rows, order in parts.values():
        for start in range(0, len(order), 4096):
            block = rows[order[start : start + 4096]]
            digest.update(block.ids.numpy().tobytes())
            digest.update(block.pos.numpy().tobytes())
    return {"teacher": str(teacher_dir.resolve()), "rows_sha256": digest.hexdigest(), "top_k": top_k}


def build_cache(load: Callable[[], torch.nn.Module], parts: dict[str, tuple[Packed, torch.Tensor]], top_k: int,
                batch: int, folder: Path, fingerprint: dict, log: Callable[[str], None] | None = None) -> None:
    """Run the teacher over `parts` (name: rows and the order they go into the cache) and write its
    top-k log-probabilities and label log-probs, one chunk file at a time.

    The teacher is loaded (`load`) only if a chunk is missing. A complete cache of this fingerprint is
    kept as is, the chunks of an interrupted one are kept and the rest computed, any other is
    deleted. `info.json` says complete, with the mean mass outside the top k, only at the end.
    `log` gets a line per chunk (for when stderr is not a terminal)."""
    plan = {"fingerprint": fingerprint, "top_k": top_k,
            "chunk_rows": chunk_rows(next(iter(parts.values()))[0].ids.shape[1], top_k)}
    old = read_json(folder / INFO) if (folder / INFO).is_file() else {}
    if old.get("complete") and all(old.get(k) == v for k, v in plan.items()):
        return
    if any(old.get(k) != v for k, v in plan.items()):
        shutil.rmtree(folder, ignore_errors=True)
        with writing(folder):
            folder.mkdir(parents=True)
        write_json(folder / INFO, plan)
    size = plan["chunk_rows"]
    todo = [(name, c) for name, (_, order) in parts.items() for c in range(-(-len(order) // size))]
    bar = tqdm(total=sum(len(order) for _, order in parts.values()), desc="teacher top-k", unit="row", disable=None)
    model, tail, positions = None, 0.0, 0
    for n, (name, c) in enumerate(todo, 1):
        path = folder / chunk_name(name, c)
        rows, order = parts[name]
        index = order[c * size : (c + 1) * size]
        if not path.is_file():
            start = time.perf_counter()
            model = model or load()
            tensors, chunk_tail = _chunk(model, rows, index, top_k, batch)
            save_tensors(path, tensors, metadata={"tail": repr(chunk_tail)})
            if log:
                log(f"teacher top-k: chunk {n}/{len(todo)} ({name}, {len(index)} rows) in "
                    f"{time.perf_counter() - start:.1f} s")
        with safe_open(path, "pt") as fh:
            tail += float(fh.metadata()["tail"])
        positions += index.numel() * rows.ids.shape[1]
        bar.update(len(index))
    bar.close()
    if model is not None:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_json(folder / INFO, {**plan, "complete": True, "tail_mass": tail / max(positions, 1)})


def _chunk(model, rows: Packed, index: torch.Tensor, top_k: int, batch: int) -> tuple[dict[str, torch.Tensor], float]:
    """The cache tensors of rows `index`, and the summed probability outside the top k."""
    out: dict[str, list[torch.Tensor]] = {key: [] for key in KEYS}
    tail = 0.0
    device = model.device
    with torch.no_grad():
        for start in range(0, len(index), batch):
            part = rows[index[start : start + batch]]
            ids, pos = part.input_ids.to(device), part.position_ids.to(device)
            lp = torch.log_softmax(logits(model, ids, pos).float(), dim=-1)
            top = lp.topk(top_k, dim=-1)
            labels = next_token_labels(ids, pos).to(lp.device)
            label_lp = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            rest = rest_log_prob(lp, top.indices)
            out["logp"].append(top.values.cpu())
            out["index"].append(top.indices.to(torch.int32).cpu())
            out["rest"].append(rest.cpu())
            out["label_logp"].append(torch.where(labels == IGNORE, 0.0, label_lp).cpu())
            tail += rest.exp().sum().item()
    return {key: torch.cat(parts) for key, parts in out.items()}, tail
