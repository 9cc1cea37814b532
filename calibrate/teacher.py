"""The distillation teacher: the source model run alongside the student, or its top-k next-token
log-probabilities computed once and read back from disk.

The second form is for models where teacher and student do not fit in memory together: one pass of
the teacher over the fit and held-out rows writes a safetensors file, the teacher is freed, and
training reads only the rows of each step. The KL is then that of both distributions coarsened to
the teacher's top k tokens plus one bucket for the rest (`top_k_kl`, as `mlakit validate` measures
it): exact when the k tokens hold all of the teacher's probability, a lower bound otherwise; the
mass left out is reported. Held-out perplexities stay exact: the teacher's log-probability of every
label is stored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mlakit.calibrate.data import Packed
from mlakit.calibrate.metrics import IGNORE, QualityMeter, next_token_labels, rest_log_prob, token_kl, top_k_kl
from mlakit.convert.checkpoint import disk_error, read_json, write_json

CACHE = "teacher-topk.safetensors"
CACHE_INFO = "teacher-topk.json"


def logits(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits of packed rows: transformers turns restarting position ids into a block-diagonal causal
    mask only when no cache is in use."""
    return model(ids, position_ids=pos, use_cache=False).logits


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
    """The teacher's top-k log-probabilities, read a row at a time from the cache file."""

    def __init__(self, path: Path) -> None:
        info = read_json(path.with_name(CACHE_INFO))
        self.top_k, self.tail_mass = info["top_k"], info["tail_mass"]
        self.path = path

    def _rows(self, name: str, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        with safe_open(self.path, "pt") as fh:
            part = fh.get_slice(name)
            return torch.cat([part[r : r + 1] for r in rows.tolist()]).to(device)

    def kl(self, part: str, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
           student_logits: torch.Tensor) -> torch.Tensor:
        top_lp, ids, rest_lp = (self._rows(f"{part}.{key}", rows, student_logits.device) for key in ("logp", "index", "rest"))
        return top_k_kl(top_lp, ids, rest_lp, torch.log_softmax(student_logits.float(), dim=-1))

    def measure(self, meter: QualityMeter, part: str, rows: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                student_logits: torch.Tensor, labels: torch.Tensor) -> None:
        dev = student_logits.device
        meter.add_cached(self._rows(f"{part}.label_logp", rows, dev), self.kl(part, rows, ids, pos, student_logits),
                         student_logits, labels)


def build_cache(model, parts: dict[str, Packed], top_k: int, batch: int, device: torch.device, path: Path,
                fingerprint: dict) -> None:
    """Run the teacher once over every part and write its top-k log-probabilities and label log-probs.

    The info file, holding the fingerprint, is written last: a cache without it is incomplete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(CACHE_INFO).unlink(missing_ok=True)
    tensors, tail, positions = {}, 0.0, 0
    bar = tqdm(total=sum(len(p) for p in parts.values()), desc="teacher top-k", unit="row", disable=None)
    with torch.no_grad():
        for name, rows in parts.items():
            labels = next_token_labels(rows.input_ids, rows.position_ids)
            logp, index, rest, label_logp = [], [], [], []
            for start in range(0, len(rows), batch):
                ids = rows.input_ids[start : start + batch].to(device)
                pos = rows.position_ids[start : start + batch].to(device)
                lp = torch.log_softmax(logits(model, ids, pos).float(), dim=-1)
                top = lp.topk(top_k, dim=-1)
                lab = labels[start : start + batch].to(device)
                label_logp.append(torch.where(lab == IGNORE, 0.0, lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0]).cpu())
                logp.append(top.values.cpu())
                index.append(top.indices.to(torch.int32).cpu())
                rest.append(rest_log_prob(lp, top.indices).cpu())
                tail += rest[-1].exp().sum().item()
                positions += ids.numel()
                bar.update(len(ids))
            tensors.update({f"{name}.logp": torch.cat(logp), f"{name}.index": torch.cat(index),
                            f"{name}.rest": torch.cat(rest), f"{name}.label_logp": torch.cat(label_logp)})
    bar.close()
    try:
        save_file(tensors, str(path))
    except OSError as exc:
        raise disk_error(exc, path) from exc
    write_json(path.with_name(CACHE_INFO), {"top_k": top_k, "tail_mass": tail / max(positions, 1),
                                            "fingerprint": fingerprint})


def cache_fingerprint(teacher_dir: Path, parts: dict[str, Packed], top_k: int) -> dict:
    """What the cache depends on: the teacher, the exact rows and k."""
    digest = hashlib.sha256()
    for rows in parts.values():
        digest.update(rows.input_ids.numpy().tobytes())
        digest.update(rows.position_ids.numpy().tobytes())
    return {"teacher": str(teacher_dir.resolve()), "rows_sha256": digest.hexdigest(), "top_k": top_k}


def cache_ready(path: Path, fingerprint: dict) -> bool:
    info = path.with_name(CACHE_INFO)
    return path.is_file() and info.is_file() and read_json(info).get("fingerprint") == fingerprint
