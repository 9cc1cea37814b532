"""Quality against the teacher: perplexities and KL(teacher || student) on next-token distributions."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_labels(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Each token's next token, or IGNORE where the next token starts another document or row."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = torch.where(position_ids[:, 1:] == 0, IGNORE, input_ids[:, 1:])
    return labels


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of every position's next-token distribution, in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def rest_log_prob(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`, summed without cancellation (-inf when nothing is left)."""
    return lp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def top_k_kl(top_lp: torch.Tensor, ids: torch.Tensor, rest_lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) with p known by its top-k log-probs `top_lp` over `ids` and the log of its remaining
    mass `rest_lp`, q by its whole log-probs `lq`: the KL of both distributions coarsened to those k
    tokens plus one bucket for the rest. A lower bound of the full KL, exact when nothing is left
    out; computed in top_lp's dtype, and differentiable in lq."""
    ids = ids.long()
    dtype = top_lp.dtype
    kl = (top_lp.exp() * (top_lp - lq.gather(-1, ids).to(dtype))).sum(-1)
    rest_p = rest_lp.to(dtype).exp()
    left = rest_p > 0
    rest_q = torch.where(left, rest_log_prob(lq, ids).to(dtype).exp(), 1.0)  # 0/0 gradients where nothing is left
    return kl + torch.where(left, torch.xlogy(rest_p, rest_p) - torch.xlogy(rest_p, rest_q), 0.0)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the labelled positions."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")


@dataclass
class Quality:
    """Held-out quality of one student against its teacher."""

    teacher_ppl: float
    student_ppl: float
    kl: float
    tokens: int
    kl_top_k: int = 0  # 0: the KL over the whole vocabulary; k: truncated to the teacher's top k tokens

    def as_dict(self) -> dict:
        return asdict(self)


class QualityMeter:
    """Accumulates sums over chunks of held-out rows."""

    def __init__(self) -> None:
        self.teacher_nll = self.student_nll = self.kl = 0.0
        self.labelled = self.positions = 0

    def add(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.teacher_nll += token_nll(teacher_logits, labels).item()
        self.student_nll += token_nll(student_logits, labels).item()
        self.kl += token_kl(teacher_logits, student_logits).sum().item()
        self.labelled += int((labels != IGNORE).sum())
        self.positions += labels.numel()

    def add_cached(self, teacher_label_logp: torch.Tensor, kl: torch.Tensor, student_logits: torch.Tensor,
                   labels: torch.Tensor) -> None:
        """Like `add`, from the teacher's stored label log-probabilities and a KL computed elsewhere."""
        self.teacher_nll -= teacher_label_logp[labels != IGNORE].sum().item()
        self.student_nll += token_nll(student_logits, labels).item()
        self.kl += kl.sum().item()
        self.labelled += int((labels != IGNORE).sum())
        self.positions += labels.numel()

    def result(self, kl_top_k: int = 0) -> Quality:
        n = max(self.labelled, 1)
        return Quality(math.exp(self.teacher_nll / n), math.exp(self.student_nll / n),
                       self.kl / max(self.positions, 1), self.positions, kl_top_k)
