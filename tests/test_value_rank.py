"""benchmarks/bench_value_rank.py: its o_proj refit sees the source's attention inputs, teacher-forced."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import make_llama
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_value_rank import refit_outputs  # noqa: E402


def test_refit_reads_the_squeezed_values_on_the_source_inputs(tmp_path: Path) -> None:
    """With every value doubled in place of the squeezed ones, each layer's head outputs are exactly
    twice the source's only if every layer's second stream takes the source's attention input: then
    the refitted o_proj is the source's halved (up to the held-out ridge), in the last layer too."""
    model = AutoModelForCausalLM.from_pretrained(make_llama(tmp_path / "src", layers=3), dtype=torch.float32).eval()
    attn = [layer.self_attn for layer in model.model.layers]
    windows = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        refits = refit_outputs(model, windows, 2, [2 * a.v_proj.weight for a in attn])
        plain = refit_outputs(model, windows, 2, [a.v_proj.weight for a in attn])
    for a, doubled, same in zip(attn, refits, plain):
        torch.testing.assert_close(doubled, a.o_proj.weight / 2, rtol=0, atol=2e-3)
        torch.testing.assert_close(same, a.o_proj.weight, rtol=0, atol=1e-4)
