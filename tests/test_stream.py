"""The layer stream that convert, layer-wise calibration and validate share: its hidden states are the
source model's, layer by layer, whatever the chunking, and the streams it carries beside them
follow the forwards a stage gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_llama
from mlakit.core.forward import source_layer
from mlakit.core.stream import LayerStream, Rows, SourceModel


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_source_stream_is_the_models_hidden_states(tmp_path: Path, model_type: str) -> None:
    """Every layer's inputs, and the final hidden states, equal transformers' own (Qwen2: q/k/v biases);
    a width that cuts the rows into chunks of one row changes nothing."""
    folder = make_llama(tmp_path / "m", model_type=model_type, layers=3)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(folder).eval()(ids, output_hidden_states=True)
        expected = out.hidden_states[:-1]
        source = SourceModel.load(folder, 24, "cpu")
        for width in (1000, 10**8):  # one chunk; chunks of one row
            stream = LayerStream(source, {"rows": Rows(ids)}, width)
            assert len(stream.chunks("rows")) == (1 if width == 1000 else 3)
            for step in stream:
                torch.testing.assert_close(step.inputs("rows"), expected[step.index], rtol=1e-5, atol=1e-5)
                step.advance()
            final = source.logits(stream.hidden("rows"))
            torch.testing.assert_close(final, out.logits, rtol=1e-4, atol=1e-4)


def test_carried_streams_follow_their_forwards(pico: Path) -> None:
    """A carried stream starts at the source's embeddings and goes through the forward its stage gives:
    the source's own layer keeps it equal to the source stream; doubling the update keeps it apart.
    Taking the next layer before advancing this one is refused."""
    source = SourceModel.load(pico, 16, "cpu")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    stream = LayerStream(source, {"a": Rows(ids), "b": Rows(ids[:1])}, 10**6,
                         carry={"same": ["a", "b"], "other": ["b"]})
    with torch.no_grad():
        for step in stream:
            layer = step.source

            def own(h: torch.Tensor, pos: torch.Tensor | None, layer=layer) -> torch.Tensor:
                return source_layer(h, layer, source.spec, source.cos, source.sin)

            step.advance(same=own, other=lambda h, pos: 2 * h)
        for part in ("a", "b"):
            torch.testing.assert_close(stream.hidden(part, "same"), stream.hidden(part), rtol=1e-5, atol=1e-5)
        embedded = source.embed(ids[:1])
        torch.testing.assert_close(stream.hidden("b", "other"), embedded * 2 ** source.layers)
    with pytest.raises(RuntimeError, match="not advanced"):
        for _ in LayerStream(source, {"a": Rows(ids)}, 10**6):
            pass
