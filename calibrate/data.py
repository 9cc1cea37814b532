"""Calibration data: read documents, tokenize them and pack them into fixed-length rows.

Rows are filled with consecutive documents; `position_ids` restart at 0 at every document start
(and at every row start), and that restart is what keeps attention inside a document: transformers
builds a block-diagonal causal mask from restarting position ids, and `core.stream.per_document` does
the same for the functional layers. The last rows are held out for the before/after summary.

Documents are streamed: files and datasets are read one document at a time, on each pass, and
tokenized a batch of documents at a time; each batch's int32 ids and position ids are appended to
files that the rows are then memory-mapped from, so that neither the text nor the tokens are ever
held whole in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlakit.core.errors import MlakitError
from mlakit.core.guard import disk_error
from mlakit.core.sampling import SampleSettings, sample_windows
from mlakit.core.text import DEFAULT_TEXT, MIX_TEXT, corpus_name, interleave, load_corpus, text_windows

JSONL_SUFFIXES = (".jsonl", ".ndjson")
HUB = "hub:"  # `--data hub:NAME...` is a Hugging Face dataset even where a local path has that name
TOKENIZE_DOCUMENTS = 1024  # documents tokenized in one call
IDS_FILE, POSITIONS_FILE = "input_ids.i32", "position_ids.i32"  # what `pack` writes, raw int32


@dataclass(frozen=True)
class Documents:
    """Texts (any iterable that can be read more than once) plus what a report and a resume check need
    to name them."""

    texts: Iterable[str]
    name: str
    sha256: str


class _Texts:
    """The non-empty documents of every source, read again at each pass."""

    def __init__(self, sources: list[Callable[[], Iterator[str]]]):
        self.sources = sources

    def __iter__(self) -> Iterator[str]:
        for source in self.sources:
            yield from (text for text in source() if text.strip())


def load_documents(specs: Sequence[str], text_field: str = "text", default: Path = DEFAULT_TEXT) -> Documents:
    """Read every `--data` value: a text file (one document), a jsonl file (one document per line,
    its `text_field`), or a Hugging Face dataset `[hub:]NAME[:CONFIG][@SPLIT]`. No value: the bundled
    text `default`. One pass here checks every document and hashes them all."""
    sources: list[Callable[[], Iterator[str]]] = []
    if not specs:
        sources.append(lambda: iter([load_corpus([default]).text]))
    for spec in specs:
        path = Path(spec).expanduser()
        if spec.startswith(HUB):
            sources.append(_dataset(spec[len(HUB):], text_field))
        elif path.is_file() and path.suffix in JSONL_SUFFIXES:
            sources.append(lambda path=path: _jsonl(path, text_field))
        elif path.is_file():
            sources.append(lambda path=path: iter([load_corpus([path]).text]))
        elif path.exists() or spec.startswith((".", "/", "~")) or path.suffix in (".txt", *JSONL_SUFFIXES):
            raise MlakitError(f"--data {spec}: no such text or jsonl file (a dataset id that is also a local "
                              f"path: {HUB}{spec})")
        else:
            sources.append(_dataset(spec, text_field))
    texts = _Texts(sources)
    digest, count = hashlib.sha256(), 0
    for text in texts:  # the digest of the documents joined by NUL, without joining them
        digest.update(b"\0" if count else b"")
        digest.update(text.encode())
        count += 1
    if not count:
        raise MlakitError(f"--data {', '.join(specs)}: no text in it")
    return Documents(texts, ", ".join(specs) or corpus_name([default]), digest.hexdigest())


DEFAULT_SET = "the default set (text sampled from the teacher and the bundled calibration mix)"


@dataclass(frozen=True)
class DefaultSet:
    """`default_set`'s rows and what the record needs to name them."""

    rows: Packed
    held_out: Packed
    name: str
    sha256: str
    record: dict


def sample_settings(conversion: dict, seq_len: int) -> SampleSettings:
    """How `convert` sampled its calibration text (its mlakit.json), so that calibration reads the same
    cached samples: that row length when it is a multiple of `seq_len` (rows are cut), else `seq_len`."""
    sampled = [s for s in conversion.get("calibration", {}).get("sources", []) if s.get("kind", "").startswith("sampled")]
    settings = SampleSettings(**{k: sampled[0][k] for k in ("seq_len", "temperature", "seed", "chat")}) if sampled \
        else SampleSettings(seq_len)
    return settings if settings.seq_len % seq_len == 0 else SampleSettings(seq_len, settings.temperature,
                                                                           settings.seed, settings.chat)


def default_set(teacher: Path, tokenizer, tokens: int, eval_tokens: int, seq_len: int, settings: SampleSettings,
                device: str, log: Callable[[str], None] | None = None) -> DefaultSet:
    """What `convert` calibrates on by default, for calibration without --data: rows of text sampled
    from the teacher (the same settings, so the samples `convert` cached are read back, and more are
    sampled only when more rows are wanted) alternated with rows spread over the bundled mix, half the
    tokens each; the last `eval_tokens` worth of rows (both kinds) held out. Measured on SmolLM2-135M
    at a quarter of the cache, layer-wise: worst unseen kind +210.1% against +241.8% on the mix alone."""
    n_eval = max(1, eval_tokens // seq_len)
    rows = max(2, tokens // seq_len) + n_eval
    n_sampled = rows // 2
    cut = settings.seq_len // seq_len
    ids, record = sample_windows(teacher, tokenizer, settings, -(-n_sampled // cut), device, log)
    sampled = ids.reshape(-1, seq_len)[:n_sampled]
    mixed, _, sha256 = text_windows(tokenizer, [MIX_TEXT], (rows - n_sampled) * seq_len, seq_len)
    windows = interleave([sampled, mixed]).to(torch.int32)
    positions = torch.arange(seq_len, dtype=torch.int32).expand_as(windows).contiguous()
    packed = Packed(windows, positions)
    n_eval = min(n_eval, len(packed) // 2)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    record = {"sources": [{**record, "tokens": int(sampled.numel())},
                          {"kind": "text", "text": corpus_name([MIX_TEXT]), "sha256": sha256,
                           "tokens": int(mixed.numel())}]}
    return DefaultSet(packed[:-n_eval], packed[-n_eval:], DEFAULT_SET, digest, record)


def _jsonl(path: Path, field: str) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MlakitError(f"{path}:{n}: not valid JSON ({exc})") from exc
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise MlakitError(f"{path}:{n}: no string field {field!r}; name the field with --text-field")
                yield record[field]
    except (OSError, UnicodeDecodeError) as exc:
        raise MlakitError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc


def _dataset(spec: str, field: str) -> Callable[[], Iterator[str]]:
    """`NAME[:CONFIG][@SPLIT]`, e.g. `wikitext:wikitext-2-raw-v1@train[:20%]` (split slicing included):
    loaded once (datasets keeps it on disk, memory-mapped), read in batches of rows at each pass."""
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
    return lambda: (text for batch in rows.iter(batch_size=1024) for text in batch[field])


@dataclass(frozen=True)
class Packed:
    """Rows of `seq_len` tokens; `position_ids` restart at each document start and each row start.

    Stored as int32, half the memory of the int64 that models take, and memory-mapped from the files
    `pack` wrote, so that only the rows read are in memory: `input_ids` and `position_ids` convert,
    so take the rows you need first (`packed[rows].input_ids`)."""

    ids: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> Packed:
        return Packed(self.ids[rows], self.pos[rows])

    @property
    def input_ids(self) -> torch.Tensor:
        return self.ids.long()

    @property
    def position_ids(self) -> torch.Tensor:
        return self.pos.long()

    @property
    def tokens(self) -> int:
        return self.ids.numel()


def pack(tokenizer, docs: Documents, seq_len: int, folder: Path) -> Packed:
    """Tokenize the documents a batch at a time and append their ids and position ids to files in
    `folder` (which must outlive the rows), filling rows back to back; a trailing partial row is
    dropped. Memory holds one batch, whatever the size of the data."""
    paths = folder / IDS_FILE, folder / POSITIONS_FILE
    total = 0
    texts = iter(docs.texts)
    while batch := list(itertools.islice(texts, TOKENIZE_DOCUMENTS)):
        tokens = tokenizer(batch, add_special_tokens=False)["input_ids"]
        lengths = np.array([len(doc) for doc in tokens], dtype=np.int64)
        count = int(lengths.sum())
        _append(paths[0], np.fromiter(itertools.chain.from_iterable(tokens), np.int32, count))
        _append(paths[1], _positions(total, lengths, seq_len))
        total += count
    n_rows = total // seq_len
    if n_rows == 0:
        raise MlakitError(f"--data has {total} tokens, fewer than one row of --seq-len {seq_len}")
    size = n_rows * seq_len  # the files may hold a partial row more
    return Packed(*(torch.from_file(str(path), shared=True, size=size, dtype=torch.int32).view(n_rows, seq_len)
                    for path in paths))


def _positions(offset: int, lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Position ids of documents of `lengths` tokens that start at token `offset` of the data: each
    token's distance to the later of its document's start and its row's start."""
    index = np.arange(offset, offset + lengths.sum())
    doc_start = np.repeat(offset + np.cumsum(lengths) - lengths, lengths)
    return (index - np.maximum(doc_start, index - index % seq_len)).astype(np.int32)


def _append(path: Path, values: np.ndarray) -> None:
    """Append to a file of packed data; a full disk is one clear error."""
    try:
        with open(path, "ab") as out:
            out.write(values.data)
    except OSError as exc:
        raise disk_error(exc, path) from exc


def spread(packed: Packed, rows: int) -> Packed:
    """`rows` rows evenly spaced over `packed` (all of them when it has no more): a corpus ordered by
    kind (a mix of sources, one after another) is then fitted on every kind, not on its first."""
    n = len(packed)
    if rows >= n:
        return packed
    return packed[torch.linspace(0, n - 1, rows).round().long()]


def hold_out(packed: Packed, eval_tokens: int) -> tuple[Packed, Packed]:
    """(rows to calibrate on, held-out rows): the last `eval_tokens` worth of rows, at most a tenth."""
    n, seq_len = packed.ids.shape
    if n < 2:
        raise MlakitError(
            f"--data gives {n} row of {seq_len} tokens; calibration needs at least 2 (one to fit, one held out): "
            "give more text or a shorter --seq-len"
        )
    n_eval = max(1, min(eval_tokens // seq_len, n // 10))
    return packed[: n - n_eval], packed[n - n_eval :]
