"""Calibration and evaluation text: read files, hash them, cut token windows.

Calibration text up to WHOLE_TEXT_BYTES is read and tokenized whole; a larger one (a corpus dump)
is never held: each window is read and tokenized where it falls in the files (`text_windows`),
so memory and time follow the calibration tokens, not the size of the text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mlakit.core.errors import MlakitError
from mlakit.core.guard import DEMO_DIR

DEFAULT_TEXT = DEMO_DIR / "docstrings.txt"
# Calibration text larger than this is read a window at a time (tokenizing it whole takes about 5
# bytes of memory per byte of text, and time in proportion).
WHOLE_TEXT_BYTES = 64 * 2**20
# Bytes read for a window of n tokens, at first: text runs 3-5 bytes a token; a short read is doubled.
READ_BYTES_PER_TOKEN = 8
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
    return Corpus(text, corpus_name(paths), hashlib.sha256(text.encode()).hexdigest())


def corpus_name(paths: list[Path]) -> str:
    bundled = {DEFAULT_TEXT: "bundled docstrings", MIX_TEXT: "bundled calibration mix"}
    return ", ".join(bundled.get(Path(p), str(p)) for p in paths)


def text_bytes(paths: list[Path]) -> int:
    """The size of the files, refusing a missing one with one line."""
    try:
        return sum(Path(p).stat().st_size for p in paths)
    except FileNotFoundError as exc:
        raise MlakitError(f"{exc.filename}: no such text file") from exc


def tokenized_bytes(paths: list[Path]) -> int:
    """How much of the files `text_windows` tokenizes at once: all of them, or one window's read."""
    size = text_bytes(paths)
    return size if size <= WHOLE_TEXT_BYTES else 0


def text_windows(tokenizer, paths: list[Path], n_tokens: int, seq_len: int,
                 lead: int | None = None) -> tuple[torch.Tensor, str, str]:
    """Windows spread evenly over the concatenated files (`token_windows` with `spread`), their name and
    the sha256 of their text. Beyond WHOLE_TEXT_BYTES the files are not read whole: each window is
    the tokens of a read at its evenly spaced byte offset, its first token dropped (a read may start
    inside one), and the hash is taken over the files' bytes, streamed."""
    if text_bytes(paths) <= WHOLE_TEXT_BYTES:
        corpus = load_corpus(paths)
        return token_windows(tokenizer, corpus.text, n_tokens, seq_len, spread=True, lead=lead), corpus.name, \
            corpus.sha256
    span = seq_len - (lead is not None)
    sizes = [Path(p).stat().st_size for p in paths]
    total, n_seq = sum(sizes), max(1, n_tokens // seq_len)
    rows = []
    for j in range(n_seq):
        at = j * total // n_seq
        k = 0
        while at >= sizes[k]:
            at, k = at - sizes[k], k + 1
        ids = _tokens_at(tokenizer, Path(paths[k]), at, span)
        if ids is not None:
            rows.append(ids)
    if not rows:
        raise MlakitError(f"{corpus_name(paths)}: no file holds a window of {seq_len} tokens; give more text or a "
                          "shorter sequence length")
    windows = torch.tensor(rows, dtype=torch.long)
    if lead is not None:
        windows = torch.cat([torch.full((len(rows), 1), lead, dtype=torch.long), windows], dim=1)
    return windows, corpus_name(paths), _stream_sha256(paths)


def _tokens_at(tokenizer, path: Path, offset: int, span: int) -> list[int] | None:
    """`span` whole tokens of the file from about byte `offset`. A read may start or end inside a token,
    so its first and last tokens are dropped (but not at the file's ends); a read that holds too few
    tokens is doubled, and moved back from the file's end. None when the file is too short."""
    end = path.stat().st_size
    size = min(span * READ_BYTES_PER_TOKEN, end)
    with path.open("rb") as fh:
        while True:
            start = max(0, min(offset, end - size))
            fh.seek(start)
            ids = tokenizer(fh.read(size).decode("utf-8", errors="ignore"), add_special_tokens=False)["input_ids"]
            ids = ids[int(start > 0):len(ids) - int(start + size < end)]
            if len(ids) >= span:
                return ids[:span]
            if size == end:
                return None
            size = min(2 * size, end)


def _stream_sha256(paths: list[Path]) -> str:
    """sha256 of the files' bytes joined by blank lines, as `load_corpus` joins their text."""
    digest = hashlib.sha256()
    for i, path in enumerate(paths):
        if i:
            digest.update(b"\n\n")
        with Path(path).open("rb") as fh:
            while chunk := fh.read(2**24):
                digest.update(chunk)
    return digest.hexdigest()


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


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several sources alternated in proportion, so that any prefix or every k-th row samples
    each source."""
    if len(parts) == 1:
        return parts[0]
    keys = torch.cat([(torch.arange(len(p)) + 0.5) / len(p) for p in parts])
    return torch.cat(parts)[keys.argsort(stable=True)]
