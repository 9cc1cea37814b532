"""benchmarks/bench_blame.py: its streams are the models they stand for."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import make_llama
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_blame import stream_nll  # noqa: E402

from mlakit.convert.pipeline import ConvertOptions, convert  # noqa: E402


def _nll(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1).mean(1)


def test_blame_streams_are_the_source_the_conversion_and_their_mixtures(tmp_path: Path) -> None:
    """The source stream and the all-converted stream give transformers' own losses of the two models;
    a stream that branches off another at a layer equals the same mixture run from the first layer."""
    src = make_llama(tmp_path / "src", layers=3)
    out = tmp_path / "mla"
    convert(str(src), out, ConvertOptions(kv_lora_rank=24, rope_dim=8, calib_tokens=256, calib_seq_len=64,
                                          dtype="fp32"), log=lambda m: None)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    streams = {"all": ({0, 1, 2}, 0, "source"), "1 alone": ({1}, 1, "source"), "1 alone, run": ({1}, 0, "source"),
               "1 restored": ({0, 2}, 1, "all"), "1 restored, run": ({0, 2}, 0, "source")}
    nll = stream_nll(src, out, ids, streams)
    torch.testing.assert_close(nll["source"], _nll(src, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll["all"], _nll(out, ids), rtol=1e-5, atol=1e-5)
    assert (nll["all"] - nll["source"]).abs().max() > 1e-3  # the conversion is not the source here
    for name in ("1 alone", "1 restored"):
        torch.testing.assert_close(nll[name], nll[f"{name}, run"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(nll["1 alone"], nll["all"]) and not torch.allclose(nll["1 alone"], nll["source"])
