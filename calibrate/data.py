"""Calibration data: read documents, tokenize them and pack them into fixed-length rows.

Rows are filled with consecutive documents; `position_ids` restart at 0 at every document start
(and at every row start), and that restart is what keeps attention inside a document: transformers
builds a block-diagonal causal mask from restarting position ids, and `per_document` does the same
for the functional layers. The last rows are held out for the before/after summary.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mlakit.convert.errors import MlakitError
from mlakit.convert.text import load_corpus

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Documents:
    """Texts plus what a report and a resume check need to name them."""

    texts: list[str]
    name: str
    sha256: str


def load_documents(specs: Sequence[str], text_field: str = "text") -> Documents:
    """Read every `--data` value: a text file (one document), a jsonl file (one document per line,
    its `text_field`), or a Hugging Face dataset `NAME[:CONFIG][@SPLIT]`. No value: the bundled text."""
    texts: list[str] = []
    if not specs:
        texts.append(load_corpus().text)
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix in JSONL_SUFFIXES:
            texts += _jsonl(path, text_field)
        elif path.is_file():
            texts.append(load_corpus([path]).text)
        elif path.exists() or spec.startswith((".", "/", "~")) or path.suffix in (".txt", *JSONL_SUFFIXES):
            raise MlakitError(f"--data {spec}: no such text or jsonl file")
        else:
            texts += _dataset(spec, text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MlakitError(f"--data {', '.join(specs)}: no text in it")
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return Documents(texts, ", ".join(specs) or "bundled docstrings", digest)


def _jsonl(path: Path, field: str) -> list[str]:
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MlakitError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MlakitError(f"{path}:{n}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise MlakitError(f"{path}:{n}: no string field {field!r}; name the field with --text-field")
        texts.append(record[field])
    return texts


def _dataset(spec: str, field: str) -> list[str]:
    """`NAME[:CONFIG][@SPLIT]`, e.g. `wikitext:wikitext-2-raw-v1@train[:20%]` (split slicing included)."""
    try:
        import datasets
    except ImportError as exc:
        raise MlakitError(
            f"--data {spec}: no such file, and reading Hugging Face datasets needs the optional extra: "
            "pip install 'mlakit[datasets]'"
        ) from exc
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # the hub and the builders raise many types; all mean "could not load"
        raise MlakitError(f"--data {spec}: could not load the dataset ({type(exc).__name__}: {exc})") from exc
    if field not in rows.column_names:
        raise MlakitError(f"--data {spec}: no column {field!r} (has {', '.join(rows.column_names)}); use --text-field")
    return list(rows[field])


@dataclass(frozen=True)
class Packed:
    """Rows of `seq_len` tokens; `position_ids` restart at each document start and each row start."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows) -> Packed:
        return Packed(self.input_ids[rows], self.position_ids[rows])

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def pack(tokenizer, docs: Documents, seq_len: int) -> Packed:
    """Tokenize every document and fill rows back to back; a trailing partial row is dropped."""
    ids = tokenizer(docs.texts, add_special_tokens=False)["input_ids"]
    flat = torch.tensor([t for doc in ids for t in doc], dtype=torch.long)
    n_rows = flat.numel() // seq_len
    if n_rows == 0:
        raise MlakitError(f"--data has {flat.numel()} tokens, fewer than one row of --seq-len {seq_len}")
    lengths = torch.tensor([len(doc) for doc in ids if doc], dtype=torch.long)
    starts = torch.zeros(flat.numel(), dtype=torch.bool)
    starts[torch.cumsum(lengths, 0)[:-1]] = True
    starts[::seq_len] = True
    index = torch.arange(flat.numel())
    last_start = torch.cummax(torch.where(starts, index, 0), 0).values
    n = n_rows * seq_len
    return Packed(flat[:n].view(n_rows, seq_len), (index - last_start)[:n].view(n_rows, seq_len))


def hold_out(packed: Packed, eval_tokens: int) -> tuple[Packed, Packed]:
    """(rows to calibrate on, held-out rows): the last `eval_tokens` worth of rows, at most a tenth."""
    n, seq_len = packed.input_ids.shape
    if n < 2:
        raise MlakitError(
            f"--data gives {n} row of {seq_len} tokens; calibration needs at least 2 (one to fit, one held out): "
            "give more text or a shorter --seq-len"
        )
    n_eval = max(1, min(eval_tokens // seq_len, n // 10))
    return packed[: n - n_eval], packed[n - n_eval :]


def document_groups(position_ids: torch.Tensor) -> list[torch.Tensor]:
    """Flat token indices of every document piece, grouped by length: one (pieces, length) tensor each."""
    b, n = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([b * n])])
    # a row start is always a piece start, so no piece crosses rows
    by_length: dict[int, list[int]] = {}
    for start, end in zip(starts.tolist(), ends.tolist()):
        by_length.setdefault(end - start, []).append(start)
    return [torch.tensor(s)[:, None] + torch.arange(length) for length, s in sorted(by_length.items())]


def per_document(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """Apply a causal sequence function (B, L, D) -> (B, L, D') to each document piece on its own."""
    if bool((position_ids == torch.arange(position_ids.shape[1], device=position_ids.device)).all()):
        return fn(x)
    b, n = position_ids.shape
    flat = x.reshape(b * n, -1)
    out = None
    for index in document_groups(position_ids):
        y = fn(flat[index.to(x.device)])
        if out is None:
            out = y.new_empty(b * n, y.shape[-1])
        out[index.reshape(-1).to(x.device)] = y.reshape(-1, y.shape[-1])
    return out.view(b, n, -1)
