"""The layer stream that convert, layer-wise calibration and validate share.

Every stage that looks inside the model works one decoder layer at a time on calibration rows: it
reads source layer i, runs its attention on the hidden states that reach it, does its own work
(statistics and factorization, fitting, measuring), and carries the hidden states on to layer
i + 1. `LayerStream` is that loop's data path. It holds, per set of rows (e.g. fitting and
held-out rows), the source model's hidden states and, when asked, those of other models that
stand in for it layer by layer (the converted model, before and after fitting), so that a stage
can fit on the converted model's own inputs (sequential calibration, as GPTQ and llm-compressor
do) or measure drift. Memory holds one source layer, the embeddings while the rows are embedded,
and the carried hidden states, whatever the depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mlakit.core.checkpoint import CheckpointReader
from mlakit.core.families import SourceLayer, SourceSpec, check_weights, load_spec, read_layer
from mlakit.core.forward import linear, mlp, rms_norm, rope_tables, row_chunks, source_attention

SOURCE = "source"
Forward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (hidden, position ids) -> next hidden


def document_groups(position_ids: torch.Tensor) -> list[torch.Tensor]:
    """Flat token indices of every document piece, grouped by length: one (pieces, length) tensor each,
    on the device of `position_ids` (every tensor made here names it: on CUDA a default-device tensor
    would be on the CPU)."""
    b, n = position_ids.shape
    device = position_ids.device
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([b * n], device=device)])
    # a row start is always a piece start, so no piece crosses rows
    by_length: dict[int, list[int]] = {}
    for start, end in zip(starts.tolist(), ends.tolist()):
        by_length.setdefault(end - start, []).append(start)
    return [torch.tensor(s, device=device)[:, None] + torch.arange(length, device=device)
            for length, s in sorted(by_length.items())]


def per_document(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
    """Apply a causal sequence function (B, L, D) -> (B, L, D') to each document piece on its own;
    `position_ids` None: every row is one document."""
    if position_ids is None or bool(
            (position_ids == torch.arange(position_ids.shape[1], device=position_ids.device)).all()):
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


class ModelEnds:
    """A checkpoint's embedding and output head, read when first needed so that both are never held early."""

    def __init__(self, reader: CheckpointReader, device: str | torch.device, eps: float):
        self.reader, self.device, self.eps = reader, device, eps

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.reader.get("model.embed_tokens.weight")[ids.cpu()].float().to(self.device)

    @functools.cached_property
    def _head(self) -> tuple[torch.Tensor, torch.Tensor]:
        name = "lm_head.weight" if "lm_head.weight" in self.reader else "model.embed_tokens.weight"
        return (self.reader.get("model.norm.weight").float().to(self.device),
                self.reader.get(name).float().to(self.device))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        norm, head = self._head
        return linear(rms_norm(h, norm, self.eps), head)

    def share_head(self, other: ModelEnds) -> bool:
        """Take `other`'s float32 final norm and output head when this checkpoint stores the same values
        (convert copies them), so that the two models hold one copy (4 GiB at Llama-3.1-70B shapes)."""
        norm, head = other._head
        name = "lm_head.weight" if "lm_head.weight" in self.reader else "model.embed_tokens.weight"
        if same_values(self.reader.get("model.norm.weight"), norm) and same_values(self.reader.get(name), head):
            self.__dict__["_head"] = other._head  # where functools.cached_property keeps its value
            return True
        return False


def same_values(stored: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether `stored`, read as float32, equals the float32 tensor `t`; compared in row blocks, so that
    no float32 copy of the whole stored tensor is made."""
    if stored.shape != t.shape:
        return False
    step = max(1, 2**24 // max(1, t[0].numel())) if t.dim() > 1 else max(1, t.shape[0])
    return all(torch.equal(stored[i:i + step].float().to(t.device), t[i:i + step]) for i in range(0, t.shape[0], step))


class SourceModel(ModelEnds):
    """The source model (Llama, Mistral, Qwen2) read one decoder layer at a time, with its functional
    forwards."""

    def __init__(self, spec: SourceSpec, reader: CheckpointReader, seq_len: int, device: str | torch.device):
        super().__init__(reader, device, spec.rms_eps)
        self.spec, self.layers = spec, spec.layers
        rot = LlamaRotaryEmbedding(spec.hf_config)
        self.cos, self.sin = (t.to(device) for t in rope_tables(rot.inv_freq, seq_len, rot.attention_scaling))

    @classmethod
    def load(cls, folder: Path, seq_len: int, device: str | torch.device) -> SourceModel:
        spec = load_spec(folder)
        reader = CheckpointReader(folder)
        check_weights(spec, reader)
        return cls(spec, reader, seq_len, device)

    def layer(self, i: int) -> SourceLayer:
        return read_layer(self.spec, self.reader, i).to(self.device)

    def attention(self, h: torch.Tensor, layer: SourceLayer, pos: torch.Tensor | None) -> torch.Tensor:
        """The attention block's output (before the residual add) on hidden states h."""
        x = rms_norm(h, layer.input_norm, self.eps)
        return per_document(lambda y: source_attention(y, layer, self.spec, self.cos, self.sin), x, pos)


@dataclass
class Rows:
    """A set of calibration rows: token ids (rows, seq_len) and position ids that restart at each
    packed document (None: every row is one document from position 0)."""

    ids: torch.Tensor
    pos: torch.Tensor | None = None


class _Part:
    """One set of rows on the device: its position ids, row chunks and hidden states per stream."""

    def __init__(self, rows: Rows, device: str | torch.device, width: int):
        self.pos = None if rows.pos is None else rows.pos.to(device)
        self.chunks = row_chunks(rows.ids.shape[0], rows.ids.shape[1], width)
        self.hidden: dict[str, torch.Tensor] = {}

    def map(self, fn: Forward, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(h[c], None if self.pos is None else self.pos[c]) for c in self.chunks])


class LayerStream:
    """Hidden states of named sets of rows carried through the source model one layer at a time.

    `carry` names other streams and the parts they are carried on, e.g. {"converted": ["held"]};
    each starts from the source's embeddings, and the stage gives the function that carries it
    through each layer (`StreamLayer.advance`). `width` bounds a chunk of rows (floats per token,
    `row_chunks`); `mlp_dtype` is what the source MLP runs in (its stored 16-bit type where that is
    fast: the MLP only makes the next layer's inputs)."""

    def __init__(self, model: SourceModel, parts: dict[str, Rows], width: int,
                 carry: dict[str, list[str]] | None = None, mlp_dtype: torch.dtype = torch.float32):
        self.model, self.mlp_dtype = model, mlp_dtype
        self.parts = {name: _Part(rows, model.device, width) for name, rows in parts.items()}
        for name, rows in parts.items():
            self.parts[name].hidden[SOURCE] = model.embed(rows.ids)
        for stream, names in (carry or {}).items():
            for name in names:
                self.parts[name].hidden[stream] = self.parts[name].hidden[SOURCE].clone()

    def __iter__(self) -> Iterator[StreamLayer]:
        """Each layer in turn; the stage calls `advance` on it before taking the next."""
        for i in range(self.model.layers):
            step = StreamLayer(self, i)
            yield step
            if not step.advanced:
                raise RuntimeError(f"layer {i} was not advanced")

    def hidden(self, part: str, stream: str = SOURCE) -> torch.Tensor:
        """The hidden states of a part: the next layer's inputs, or after the last layer the final ones."""
        return self.parts[part].hidden[stream]

    def chunks(self, part: str) -> list[slice]:
        return self.parts[part].chunks

    def positions(self, part: str) -> torch.Tensor | None:
        return self.parts[part].pos


class StreamLayer:
    """Layer `index` of a `LayerStream`: the source layer on the device (read when first used, after the
    previous layer is freed), its inputs per part and stream, and the source attention's output on the
    source's inputs (the target of every fit), computed once."""

    def __init__(self, stream: LayerStream, index: int):
        self.stream, self.index = stream, index
        self._targets: dict[str, torch.Tensor] = {}
        self.advanced = False

    @functools.cached_property
    def source(self) -> SourceLayer:
        return self.stream.model.layer(self.index)

    def inputs(self, part: str, stream: str = SOURCE) -> torch.Tensor:
        return self.stream.hidden(part, stream)

    def normed(self, part: str, c: slice, stream: str = SOURCE) -> torch.Tensor:
        """Chunk c of a part's inputs through the source layer's input norm."""
        return rms_norm(self.inputs(part, stream)[c], self.source.input_norm, self.stream.model.eps)

    def target(self, part: str) -> torch.Tensor:
        """The source attention's output on the part's source inputs."""
        if part not in self._targets:
            model, p = self.stream.model, self.stream.parts[part]
            self._targets[part] = p.map(lambda h, pos: model.attention(h, self.source, pos), p.hidden[SOURCE])
        return self._targets[part]

    def advance(self, **forwards: Forward) -> None:
        """Carry every stream to the next layer's inputs: the source's through the source layer (its
        attention output reused), every other through the forward the stage gives for it."""
        model, dtype = self.stream.model, self.stream.mlp_dtype
        weights = [w.to(dtype) for w in (self.source.gate, self.source.up, self.source.down)]
        for name, part in self.stream.parts.items():
            target = self.target(name)
            h = part.hidden[SOURCE]
            for c in part.chunks:
                a = h[c] + target[c]
                h[c] = a + mlp(rms_norm(a, self.source.post_norm, model.eps).to(dtype), *weights).float()
            del self._targets[name]
            for stream, h in part.hidden.items():
                if stream != SOURCE:
                    part.hidden[stream] = part.map(forwards[stream], h)
        self.advanced = True
