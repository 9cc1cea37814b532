"""Calibration and evaluation text: read files, hash them, cut token windows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mlakit.core.errors import MlakitError
from mlakit.core.guard import DEMO_DIR

DEFAULT_TEXT = DEMO_DIR / "docstrings.txt"
# The bundled half of the default calibration set (its sources and licences: data/README.md).
MIX_TEXT = DEMO_DIR.parent / "data" / "calibration_mix.txt"


@dataclass(frozen=True)
class Corpus:
    """Text plus what a report needs to name it."""

    text: str
    name: str
    sha256: str


def load_corpus(paths: list[Path] | None = None) -> Corpus:
    """Concatenate text files (the bundled docstrings when none are given)."""
    paths = paths or [DEFAULT_TEXT]
    parts = []
    for path in paths:
        try:
            parts.append(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise MlakitError(f"{path}: no such text file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise MlakitError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    text = "\n\n".join(parts)
    if not text.strip():
        raise MlakitError(f"{', '.join(map(str, paths))}: the text is empty")
    bundled = {DEFAULT_TEXT: "bundled docstrings", MIX_TEXT: "bundled calibration mix"}
    name = ", ".join(bundled.get(Path(p), str(p)) for p in paths)
    return Corpus(text, name, hashlib.sha256(text.encode()).hexdigest())


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int, *, what: str = "calibration",
                  spread: bool = False, lead: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens, as many as fit in `n_tokens` (at least one):
    the first ones, or with `spread` evenly spaced over the whole text, so that calibration samples
    every part of it (every file of a concatenation) rather than its beginning. With `lead`, each
    window is that token followed by `seq_len - 1` text tokens, the way served prompts start with a
    special token on which real models put their attention sink."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    span = seq_len - (lead is not None)
    n_seq = min(len(ids) // span, max(1, n_tokens // seq_len)) if span else 0
    if n_seq < 1:
        raise MlakitError(
            f"the {what} text has {len(ids)} tokens, fewer than one window of {seq_len}; give more text or a "
            "shorter sequence length"
        )
    ids = torch.tensor(ids, dtype=torch.long)
    stride = len(ids) // n_seq if spread else span
    windows = torch.stack([ids[i * stride: i * stride + span] for i in range(n_seq)])
    if lead is None:
        return windows
    return torch.cat([torch.full((n_seq, 1), lead, dtype=torch.long), windows], dim=1)


def bos_token(tokenizer) -> int:
    """The tokenizer's BOS id, for windows that start the way served prompts do."""
    if tokenizer.bos_token_id is None:
        raise MlakitError("the tokenizer has no bos_token, so calibration windows cannot start with one; "
                          "convert without --calib-bos")
    return tokenizer.bos_token_id
