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

    def result(self) -> Quality:
        n = max(self.labelled, 1)
        return Quality(math.exp(self.teacher_nll / n), math.exp(self.student_nll / n),
                       self.kl / max(self.positions, 1), self.positions)
